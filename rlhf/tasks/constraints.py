"""Instruction constraints (IFEval's kind, Zhou et al. 2023): a short open-ended request about a
topic and ONE checkable constraint, e.g. "Describe autumn briefly. Do not use any commas in your
answer." There is no right answer to imitate, only a checker: the gold measure of open-ended text.

A prompt is `<request> <constraint sentence>`: one of `REQUESTS` about one of `TOPICS`, then the
constraint's sentence (`SENTENCES`), always last, so `parse_constraint` reads it back by regex.
A record's reference answer is the constraint as canonical JSON, `{"kind": "max_words", "arg": 10}`
(`answer_of`); `is_correct(response, answer)` checks the response against it.

The checkers (`CHECKS`), applied to the response with surrounding white space stripped; an empty
response satisfies no constraint:
- max_words / min_words: at most / at least n words, counted as `len(text.split())`;
- include_word / avoid_word: the word appears / does not appear, case-insensitively, on word
  boundaries (`\\bthe\\b`: "The" counts as "the", "there" does not);
- lowercase / uppercase: the text has letters, and no letter is upper / lower case (only letters
  are checked: digits and punctuation are free; a text with no letters fails both);
- no_commas: no comma (neither "," nor the full-width "，");
- end_phrase: the text ends with the phrase exactly (case and punctuation included);
- start_word: the first word, with its punctuation removed ("Yes," -> "Yes"), is the word,
  case-insensitively (IFEval's rule);
- bullets: exactly k non-empty lines, each starting with "- " or "* " and holding text after it
  (blank lines between them are allowed, any other line fails);
- json_keys: the text (or the inside of one ```json / ``` fence around it) parses with
  `json.loads` to an object holding both keys (other keys allowed);
- quotation: the text starts and ends with a double quotation mark ('"') with text between.

Data: the validation split is `eval_size` prompts spread evenly over the kinds, from data_seed + 1;
the test split `test_per_bucket` prompts of each kind from test_seed, none of them a validation
prompt; both without repeats (each kind's prompts are enumerated and shuffled). Training prompts
(`train_records`, for PPO and for the label stage's rejection sampling) are drawn with
data_seed + offset, each kind equally likely, and skip every held-out prompt. They hold no
reference text (`Task.imitable` False): SFT data for this task comes from rejection sampling.
The digit fields of the task config (train_digits, eval_digits, train_weights) do not apply.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

from rlhf.tasks.base import BucketExhausted, Task, TaskSpec, bucket_report, draw_unreserved

REQUESTS = (
    "Write a sentence about {topic}.",
    "Describe {topic} briefly.",
    "Give a short tip about {topic}.",
    "Tell me one fact about {topic}.",
    "Explain {topic} in simple terms.",
)
# everyday topics: no quotes or commas, so a topic never looks like part of a constraint
TOPICS = (
    "the ocean", "coffee", "a bicycle", "autumn", "the moon", "bread", "a library", "rain",
    "the city at night", "a garden", "tea", "winter", "a train journey", "music", "the forest",
    "a cat", "a dog", "the beach", "mountains", "a river", "breakfast", "the sun", "snow",
    "a good book", "cooking", "friendship", "the wind", "a market", "a bridge", "the desert",
    "a lighthouse", "spring", "summer", "a thunderstorm", "the stars", "a kitchen", "walking",
    "sleep", "a museum", "the sky", "apples", "a camera", "a clock", "the rainforest", "a park",
    "a birthday", "chess", "a piano", "swimming", "a volcano", "honey", "an island", "a farm",
    "a school", "the internet", "a phone", "bees", "the weekend", "a picnic", "running",
    "a map", "the post office", "a candle", "chocolate", "the harbor", "a bus ride", "paper",
    "gardening", "a hat", "the morning", "a lake", "rice", "a tree", "the kitchen table",
    "a violin", "painting", "a cloud", "a window", "the mail", "a sandwich", "birds", "an owl",
    "soup", "a festival", "the subway", "a bakery", "oranges", "a puzzle", "a blanket",
    "a rainbow", "a storm", "a teacher", "cheese", "a telescope", "a notebook", "a campfire",
    "the desk", "a hike", "a pencil", "the zoo",
)  # fmt: skip

KINDS = (
    "max_words",
    "min_words",
    "include_word",
    "avoid_word",
    "lowercase",
    "uppercase",
    "no_commas",
    "end_phrase",
    "start_word",
    "bullets",
    "json_keys",
    "quotation",
)
# each kind's parameter values; None: the kind takes none
ARGS: dict[str, tuple] = {
    "max_words": tuple(range(5, 21)),
    "min_words": tuple(range(15, 31)),
    "include_word": ("light", "water", "friend", "simple", "morning", "color", "small", "home", "people",
                     "always", "warm", "green"),
    "avoid_word": ("the", "and", "is", "a", "of", "to", "in", "it"),
    "lowercase": (None,),
    "uppercase": (None,),
    "no_commas": (None,),
    "end_phrase": ("Have a nice day.", "That is all.", "Thank you for reading.", "I hope this helps.",
                   "Is there anything else?", "The end."),
    "start_word": ("Yes", "Today", "Imagine", "Remember", "Sometimes", "Honestly", "Here", "Well"),
    "bullets": (2, 3, 4),
    "json_keys": (("title", "summary"), ("topic", "fact"), ("name", "description"), ("answer", "reason"),
                  ("subject", "detail"), ("idea", "example")),
    "quotation": (None,),
}  # fmt: skip
# the constraint's sentence, always the prompt's last; `str.format(arg=...)` (json_keys: a, b)
SENTENCES = {
    "max_words": "Answer in at most {arg} words.",
    "min_words": "Answer in at least {arg} words.",
    "include_word": "Use the word '{arg}' in your answer.",
    "avoid_word": "Do not use the word '{arg}'.",
    "lowercase": "Write your whole answer in lowercase letters only.",
    "uppercase": "Write your whole answer in capital letters only.",
    "no_commas": "Do not use any commas in your answer.",
    "end_phrase": "End your answer with the exact phrase '{arg}'.",
    "start_word": "Start your answer with the word '{arg}'.",
    "bullets": "Answer with exactly {arg} bullet points, each on its own line starting with '- '.",
    "json_keys": 'Answer with a JSON object only, with the keys "{a}" and "{b}".',
    "quotation": "Wrap your whole answer in double quotation marks.",
}
# each sentence as a regex anchored at the prompt's end; groups: the parameter (json_keys: both keys)
_PATTERNS = {
    kind: re.compile(
        re.escape(s)
        .replace(re.escape("{arg}"), r"(\d+)" if kind in ("max_words", "min_words", "bullets") else r"([^']+)")
        .replace(re.escape("{a}"), r"(\w+)")
        .replace(re.escape("{b}"), r"(\w+)")
        + r"\s*\Z"
    )
    for kind, s in SENTENCES.items()
}
ANSWER_TOKENS = 64  # room for the longest request (30 words, or a few bullets or a small JSON object)


# ---- constraints and their checkers -------------------------------------------------------------------


def sentence(kind: str, arg) -> str:
    """The constraint's sentence, e.g. sentence("max_words", 10) -> "Answer in at most 10 words."."""
    if kind == "json_keys":
        return SENTENCES[kind].format(a=arg[0], b=arg[1])
    return SENTENCES[kind].format(arg=arg)


def answer_of(kind: str, arg) -> str:
    """A record's reference answer: the constraint as canonical JSON, '{"kind": "max_words", "arg": 10}'."""
    return json.dumps({"kind": kind, "arg": list(arg) if isinstance(arg, tuple) else arg})


def parse_answer(answer: str) -> tuple[str, object]:
    """(kind, arg) of a reference answer (json_keys' keys as a tuple); ValueError if it is none."""
    try:
        spec = json.loads(answer)
        kind, arg = spec["kind"], spec["arg"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"not a constraint answer: {answer[:80]!r}") from e
    if kind not in CHECKS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {list(KINDS)}")
    return kind, tuple(arg) if isinstance(arg, list) else arg


def parse_constraint(question: str) -> tuple[str, object]:
    """(kind, arg) of the constraint sentence that ends a prompt; ValueError if none does."""
    for kind, pattern in _PATTERNS.items():
        match = pattern.search(question)
        if match:
            groups = match.groups()
            if kind == "json_keys":
                return kind, groups
            if not groups:
                return kind, None
            return kind, int(groups[0]) if kind in ("max_words", "min_words", "bullets") else groups[0]
    raise ValueError(f"no constraint at the end of prompt: {question[-80:]!r}")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _json_object(text: str) -> dict | None:
    fenced = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _bullets(text: str, k: int) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) == k and all(line.startswith(("- ", "* ")) for line in lines)


def _first_word(text: str) -> str:
    return re.sub(r"[^\w]", "", text.split()[0])


def _cased(text: str, case: Callable[[str], str]) -> bool:
    return any(c.isalpha() for c in text) and case(text) == text


# kind -> (stripped, non-empty response, arg) -> satisfied?
CHECKS: dict[str, Callable[[str, object], bool]] = {
    "max_words": lambda text, n: len(text.split()) <= n,
    "min_words": lambda text, n: len(text.split()) >= n,
    "include_word": _has_word,
    "avoid_word": lambda text, w: not _has_word(text, w),
    "lowercase": lambda text, _: _cased(text, str.lower),
    "uppercase": lambda text, _: _cased(text, str.upper),
    "no_commas": lambda text, _: "," not in text and "，" not in text,
    "end_phrase": lambda text, phrase: text.endswith(phrase),
    "start_word": lambda text, w: _first_word(text).lower() == w.lower(),
    "bullets": _bullets,
    "json_keys": lambda text, keys: (obj := _json_object(text)) is not None and all(k in obj for k in keys),
    "quotation": lambda text, _: len(text) > 2 and text[0] == text[-1] == '"' and bool(text[1:-1].strip()),
}


def check(kind: str, arg, response: str) -> bool:
    """Whether the response satisfies the constraint (rules in the module doc)."""
    text = response.strip()
    return bool(text) and CHECKS[kind](text, arg)


def is_correct(response: str, answer: str) -> bool:
    """The checker, the gold measure: does the response satisfy the constraint in `answer`?"""
    return check(*parse_answer(answer), response)


# ---- prompts and splits -------------------------------------------------------------------------------

Item = tuple[str, str, object]  # (prompt, kind, arg): the prompt alone decides the other two


def prompt_of(request: str, topic: str, kind: str, arg) -> str:
    return f"{request.format(topic=topic)} {sentence(kind, arg)}"


@lru_cache(maxsize=len(KINDS))
def pool(kind: str) -> tuple[Item, ...]:
    """Every prompt of a kind, in a fixed order: each parameter x request x topic."""
    return tuple((prompt_of(r, t, kind, arg), kind, arg) for arg in ARGS[kind] for r in REQUESTS for t in TOPICS)


def draw(rng: random.Random, kind: str) -> Item:
    """One prompt of a kind: request, topic and parameter drawn uniformly."""
    request, topic, arg = rng.choice(REQUESTS), rng.choice(TOPICS), rng.choice(ARGS[kind])
    return prompt_of(request, topic, kind, arg), kind, arg


def _shuffled(kind: str, rng: random.Random) -> list[Item]:
    items = list(pool(kind))
    rng.shuffle(items)
    return items


@lru_cache(maxsize=8)
def _splits(eval_size: int, data_seed: int, per_kind: int, test_seed: int) -> tuple[tuple[Item, ...], ...]:
    """(validation, test): distinct prompts, grouped by kind in KINDS order."""
    counts = Counter(KINDS[i * len(KINDS) // eval_size] for i in range(eval_size))
    for kind in KINDS:  # training draws must still find unreserved prompts of every kind quickly
        if 2 * (counts[kind] + per_kind) > len(pool(kind)):
            raise BucketExhausted(
                f"the held-out splits would take {counts[kind]} + {per_kind} of the {len(pool(kind))} prompts of "
                f"constraint kind {kind!r}, more than half, leaving too few for training; lower "
                "task.test_per_bucket or task.eval_size"
            )
    rng = random.Random(data_seed + 1)
    validation = [item for kind in KINDS for item in _shuffled(kind, rng)[: counts[kind]]]
    seen = {prompt for prompt, _, _ in validation}
    rng = random.Random(test_seed)
    test = [item for kind in KINDS for item in [i for i in _shuffled(kind, rng) if i[0] not in seen][:per_kind]]
    return tuple(validation), tuple(test)


def validation_items(task: TaskSpec) -> list[Item]:
    return list(_splits(task.eval_size, task.data_seed, task.test_per_bucket, task.test_seed)[0])


def test_split_items(task: TaskSpec) -> list[Item]:
    return list(_splits(task.eval_size, task.data_seed, task.test_per_bucket, task.test_seed)[1])


def reserved(task: TaskSpec) -> frozenset[Item]:
    """Every held-out prompt (validation and test): no training draw is one of them."""
    validation, test = _splits(task.eval_size, task.data_seed, task.test_per_bucket, task.test_seed)
    return frozenset(validation + test)


def train_items(task: TaskSpec, seed_offset: int = 0) -> list[Item]:
    """train_size prompts from data_seed + seed_offset, each kind equally likely, none held out."""
    rng, held_out = random.Random(task.data_seed + seed_offset), reserved(task)
    out = []
    for _ in range(task.train_size):
        kind = rng.choice(KINDS)
        out.append(draw_unreserved(partial(draw, rng, kind), held_out, kind))
    return out


def train_records(task: TaskSpec, seed_offset: int = 0) -> list[dict]:
    """Prompt-only records {"prompt": [user message], "answer": the constraint}: nothing to imitate."""
    return [
        {"prompt": [{"role": "user", "content": q}], "answer": answer_of(kind, arg)}
        for q, kind, arg in train_items(task, seed_offset)
    ]


def eval_records(task: TaskSpec) -> list[dict]:
    """The validation split {"prompt", "answer"}: eval_size prompts spread evenly over the kinds."""
    return [{"prompt": q, "answer": answer_of(kind, arg)} for q, kind, arg in validation_items(task)]


def test_records(task: TaskSpec) -> list[dict]:
    """The test split {"prompt", "answer"}: test_per_bucket prompts of each kind, none a validation one."""
    return [{"prompt": q, "answer": answer_of(kind, arg)} for q, kind, arg in test_split_items(task)]


def pair_records(
    task: TaskSpec, kinds: Sequence[str], size: int, split: str, weights: Sequence[float] | None = None
) -> list[dict]:
    raise ValueError(
        "the constraints task generates no pairs: label the model's own samples with stage2_label (labeller.name=rule)"
    )


# ---- scoring and the rule reward ----------------------------------------------------------------------


def report(questions: Sequence[str], answers: Sequence[str], responses: Sequence[str]) -> dict:
    """eval.json's task block: the share of responses that satisfy their constraint, overall and per
    kind (accuracy_by_kind / stderr_by_kind / n_by_kind), and the responses' mean length in words and
    characters (a policy that games a learned reward often does it by length)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for question, answer, response in zip(questions, answers, responses, strict=True):
        hits[parse_constraint(question)[0]].append(is_correct(response, answer))
    n = max(len(responses), 1)
    return {
        **bucket_report("constraints", hits, by="kind"),
        "mean_words": round(sum(len(r.split()) for r in responses) / n, 2),
        "mean_chars": round(sum(len(r) for r in responses) / n, 2),
    }


def constraint_met(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 when the response satisfies the constraint its prompt ends with, else 0.0 (and 0.0 for a
    prompt that holds no constraint)."""
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            kind, arg = parse_constraint(question)
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(check(kind, arg, response)))
    return out


TASK = Task(
    name="constraints",
    train_records=train_records,
    eval_records=eval_records,
    test_records=test_records,
    preference_records=pair_records,
    is_correct=is_correct,
    bucket=lambda question: parse_constraint(question)[0],
    score=report,
    rules={"constraint_met": constraint_met},
    wrong_kinds=(),
    answer_tokens=lambda task: ANSWER_TOKENS,
    # the prompts are English whatever task.prompt_language says: zh (its default) and en both give them
    languages=("en",),
    imitable=False,
)
