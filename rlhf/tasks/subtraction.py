"""Seed 000's subtraction task: generators in the seed's formats, the checker, per-digit accuracy,
its rule rewards and the kinds of wrong answers for reward-model pairs; registered as `TASK`.

The seed asks `请计算：x - y = ，直接返回计算结果` and expects the exact integer x − y. Its test set has
1,000 items, a quarter each with x of up to 2, 5, 10 and 20 digits (`dx`), and y of 1..dx digits.
Its scripts draw x = int(random() * 10**dx), dy = int(random() * dx) + 1, y = int(random() * 10**dy);
`sample_item` draws the same way, from a seeded `random.Random` so files are reproducible.

Two deliberate differences from the seed's scripts, both documented in docs/data.md:
- the seed's SFT script writes `%d + %d` in the question while the answer is x − y (a typo in
  the post); our SFT generator writes `-`. Files written by the seed's script still load.
- run verbatim, the seed's SFT script writes raw newlines inside JSON strings (its `\\n` are
  Python escapes). Our writer uses `json.dumps`, so every line is valid JSON.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Sequence
from functools import lru_cache, partial
from pathlib import Path

from rlhf.tasks.base import Task, TaskSpec, bucket_report, draw_unreserved

PROMPT = "请计算：%d - %d = ，直接返回计算结果"
SEED_BUCKETS = (2, 5, 10, 20)

# The few-shot instruction of the seed's SFT set, with its operator typo fixed (see module doc).
FEWSHOT_PROMPT = (
    "你是一个数学计算器，能计算两个数字的减法。\n"
    "请直接返回计算结果，不要包含计算过程，也不要包含算式和等于号，直接给出结果的数字。\n"
    "例子：\n"
    "<input>请计算：29 - 68 = ，直接返回计算结果</input>\n<output>-39</output>\n"
    "<input>请计算：87 - 16 = ，直接返回计算结果</input>\n<output>71</output>\n"
    "<input>请计算：75 - 99 = ，直接返回计算结果</input>\n<output>-24</output>\n"
    "<input>请计算：32 - 7 = ，直接返回计算结果</input>\n<output>25</output>\n"
    "<input>请计算：35 - 2 = ，直接返回计算结果</input>\n<output>33</output>\n"
    "输入：\n"
    "请计算：%d - %d = ，直接返回计算结果"
)

# An English rendering for pretrained chat models that read English better than Chinese
# (`task.prompt_language: en`; docs/real-model.md measures both on SmolLM2-135M-Instruct).
EN_PROMPT = "Compute: %d - %d = , reply with the result only"
EN_FEWSHOT_PROMPT = (
    "You are a calculator that subtracts two numbers.\n"
    "Reply with the result only: no working, no equation, no equals sign, just the number.\n"
    "Examples:\n"
    "<input>Compute: 29 - 68 = , reply with the result only</input>\n<output>-39</output>\n"
    "<input>Compute: 87 - 16 = , reply with the result only</input>\n<output>71</output>\n"
    "<input>Compute: 75 - 99 = , reply with the result only</input>\n<output>-24</output>\n"
    "<input>Compute: 32 - 7 = , reply with the result only</input>\n<output>25</output>\n"
    "<input>Compute: 35 - 2 = , reply with the result only</input>\n<output>33</output>\n"
    "Input:\n"
    "Compute: %d - %d = , reply with the result only"
)
# (language, few-shot?) -> the question's format
PROMPTS = {
    ("zh", False): PROMPT,
    ("zh", True): FEWSHOT_PROMPT,
    ("en", False): EN_PROMPT,
    ("en", True): EN_FEWSHOT_PROMPT,
}
LANGUAGES = ("zh", "en")

# Matches the question in every prompt, the seed's `+` typo included; the last match is the
# question (the few-shot prompts quote five solved examples before it).
_QUESTION = re.compile(r"(?:请计算：|Compute: )(-?\d+) [-+] (-?\d+) = ")

WRONG_KINDS = ("wrong_digit", "missed_borrow", "sign_error", "dropped_digit")


def sample_item(rng: random.Random, dx: int) -> tuple[int, int]:
    """One (x, y) exactly as the seed's scripts draw it for a bucket of `dx` digits."""
    x = int(rng.random() * (10**dx))
    dy = int(rng.random() * dx) + 1
    y = int(rng.random() * (10**dy))
    return x, y


def bucket_of(x: int, y: int, buckets: Sequence[int] = SEED_BUCKETS) -> int:
    """The digit bucket of an item: the smallest bucket that holds both operands.

    Files in the seed's format do not record the bucket an item was drawn for; this recovers it
    for all but the rare items whose x happened to be short (e.g. x < 100 drawn for dx = 5).
    """
    width = max(len(str(abs(x))), len(str(abs(y))))
    for b in sorted(buckets):
        if width <= b:
            return b
    return max(buckets)


def parse_question(prompt: str) -> tuple[int, int]:
    """(x, y) of the question in a seed prompt; ValueError if there is none."""
    matches = _QUESTION.findall(prompt)
    if not matches:
        raise ValueError(f"no subtraction question in prompt: {prompt[:80]!r}")
    x, y = matches[-1]
    return int(x), int(y)


def is_correct(response: str, answer: str) -> bool:
    """Exact match of the integer, ignoring surrounding white space (the seed's scoring)."""
    return response.strip() == str(answer).strip()


def test_items(
    n: int, digits: Sequence[int], seed: int, exclude: Container[tuple[int, int]] = frozenset()
) -> list[tuple[int, int, int]]:
    """(dx, x, y) for n items split evenly over `digits`, in the seed's order; an (x, y) in
    `exclude` is skipped and its bucket drawn again (nothing excluded: the seed's stream)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dx = digits[i * len(digits) // n]
        x, y = draw_unreserved(partial(sample_item, rng, dx), exclude, dx)
        out.append((dx, x, y))
    return out


def train_items(
    n: int,
    digits: Sequence[int],
    weights: Sequence[float] | None,
    seed: int,
    exclude: Container[tuple[int, int]] = frozenset(),
):
    """(dx, x, y) for n items with dx drawn from `digits` by `weights` (uniform if None); an
    (x, y) in `exclude` is skipped and its bucket drawn again."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        dx = rng.choices(digits, weights=weights)[0]
        x, y = draw_unreserved(partial(sample_item, rng, dx), exclude, dx)
        out.append((dx, x, y))
    return out


def validation_items(task: TaskSpec) -> list[tuple[int, int, int]]:
    """The validation split (in-loop evaluation, tuning): eval_size items over eval_digits, from data_seed + 1."""
    return test_items(task.eval_size, task.eval_digits, task.data_seed + 1)


def test_split_items(task: TaskSpec) -> list[tuple[int, int, int]]:
    """The test split: test_per_bucket items in each bucket of eval_digits, drawn with test_seed,
    none of them a validation item (and `reserved` keeps them out of every training set)."""
    return list(
        _test_split(task.eval_size, tuple(task.eval_digits), task.data_seed, task.test_per_bucket, task.test_seed)
    )


@lru_cache(maxsize=8)
def _test_split(eval_size, eval_digits, data_seed, per_bucket, test_seed) -> tuple[tuple[int, int, int], ...]:
    validation = test_items(eval_size, eval_digits, data_seed + 1)
    seen = frozenset((x, y) for _, x, y in validation)
    return tuple(test_items(per_bucket * len(eval_digits), eval_digits, test_seed, exclude=seen))


def reserved(task: TaskSpec) -> frozenset[tuple[int, int]]:
    """The (x, y) of the test split: no generated training item or pair is one of them."""
    return frozenset((x, y) for _, x, y in test_split_items(task))


def question(x: int, y: int, fewshot: bool = False, language: str = "zh") -> str:
    """The question x − y in the seed's prompt (`zh`) or its English rendering (`en`)."""
    return PROMPTS[language, fewshot] % (x, y)


def test_record(x: int, y: int, language: str = "zh") -> dict:
    """A line of the seed's test file: {"prompt": ..., "answer": ...}."""
    return {"prompt": question(x, y, language=language), "answer": str(x - y)}


def sft_record(x: int, y: int, fewshot: bool = True, language: str = "zh") -> dict:
    """A line of the seed's SFT file: {"messages": [user, assistant]}."""
    question_ = question(x, y, fewshot, language)
    return {
        "messages": [
            {"role": "user", "content": question_},
            {"role": "assistant", "content": str(x - y)},
        ]
    }


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records one JSON object per line (atomically: aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def wrong_answer(x: int, y: int, kind: str, rng: random.Random) -> str | None:
    """A realistic wrong answer to x − y of the given kind, or None if the kind does not apply.

    - wrong_digit: one digit of the result replaced by another;
    - missed_borrow: a borrow forgotten in column subtraction (the result too large by 10^(k+1));
    - sign_error: the right magnitude with the wrong sign;
    - dropped_digit: one digit of the result left out.
    """
    diff = x - y
    sign = "-" if diff < 0 else ""
    mag = str(abs(diff))
    if kind == "wrong_digit":
        i = rng.randrange(len(mag))
        choices = [d for d in "0123456789" if d != mag[i] and not (i == 0 and d == "0" and len(mag) > 1)]
        out = sign + mag[:i] + rng.choice(choices) + mag[i + 1 :]
    elif kind == "missed_borrow":
        big, small = (x, y) if diff >= 0 else (y, x)
        borrows = _borrow_columns(big, small)
        if not borrows:
            return None
        k = rng.choice(borrows)  # column k borrowed from column k + 1; forgetting it adds 10^(k+1)
        out = sign + str(abs(diff) + 10 ** (k + 1))
    elif kind == "sign_error":
        if diff == 0:
            return None
        out = str(-diff)
    elif kind == "dropped_digit":
        if len(mag) < 2:
            return None
        i = rng.randrange(len(mag))
        rest = mag[:i] + mag[i + 1 :]
        out = sign + str(int(rest))
    else:
        raise ValueError(f"unknown kind of wrong answer {kind!r}; expected one of {WRONG_KINDS}")
    return None if out == str(diff) else out


def preference_record(
    x: int,
    y: int,
    kinds: Sequence[str],
    rng: random.Random,
    fewshot: bool = False,
    weights: Sequence[float] | None = None,
    language: str = "zh",
) -> dict | None:
    """A pair in the prompt/chosen/rejected format: the right difference against a wrong answer
    of a kind drawn (by `weights`, uniform if None) from those that apply to this item, recorded
    in `kind`; None if no kind applies (1 - 1 has no sign to flip and no digit to drop)."""
    options = list(kinds)
    chances = list(weights) if weights is not None else [1.0] * len(options)
    while options:
        kind = rng.choices(options, weights=chances)[0]
        chances.pop(options.index(kind))
        options.remove(kind)
        wrong = wrong_answer(x, y, kind, rng)
        if wrong is not None:
            return {"prompt": question(x, y, fewshot, language), "chosen": str(x - y), "rejected": wrong, "kind": kind}
    return None  # every item admits a wrong digit, so only when kinds leaves it out


def _borrow_columns(big: int, small: int) -> list[int]:
    """Columns (0 = units) where big − small borrows from the next column; big ≥ small ≥ 0."""
    cols, borrow, k = [], 0, 0
    while big or small:
        a, b = big % 10 - borrow, small % 10
        borrow = int(a < b)
        if borrow:
            cols.append(k)
        big, small, k = big // 10, small // 10, k + 1
    return cols


def train_records(task: TaskSpec, seed_offset: int = 0) -> list[dict]:
    """SFT records; items depend on data_seed + seed_offset (PPO draws fresh prompts with an
    offset); no test-split item among them."""
    items = train_items(
        task.train_size, task.train_digits, task.train_weights, task.data_seed + seed_offset, reserved(task)
    )
    return [sft_record(x, y, task.fewshot, task.prompt_language) for _, x, y in items]


def eval_records(task: TaskSpec) -> list[dict]:
    """The validation split {"prompt", "answer"}, from data_seed + 1."""
    return _held_out_records(validation_items(task), task.fewshot, task.prompt_language)


def test_records(task: TaskSpec) -> list[dict]:
    """The test split {"prompt", "answer"}, from test_seed (see `test_split_items`)."""
    return _held_out_records(test_split_items(task), task.fewshot, task.prompt_language)


def _held_out_records(items: Sequence[tuple[int, int, int]], fewshot: bool, language: str) -> list[dict]:
    return [{"prompt": question(x, y, fewshot, language), "answer": str(x - y)} for _, x, y in items]


def pair_records(
    task: TaskSpec, kinds: Sequence[str], size: int, split: str, weights: Sequence[float] | None = None
) -> list[dict]:
    """Chosen/rejected pairs for `split` ("train" or "eval"): the right answer against a realistic
    wrong one (see `wrong_answer`), its kind drawn by `weights`; from data_seed + 10 / + 11, no
    test-split item among them."""
    offset = 10 if split == "train" else 11
    if split == "train":
        items = train_items(size, task.train_digits, task.train_weights, task.data_seed + offset, reserved(task))
    else:
        items = test_items(size, task.eval_digits, task.data_seed + offset, reserved(task))
    rng = random.Random(task.data_seed + offset)
    return [
        r
        for _, x, y in items
        if (r := preference_record(x, y, kinds, rng, task.fewshot, weights, task.prompt_language))
    ]


def answer_chars(task: TaskSpec) -> int:
    """Characters of the longest difference for this config: x < 10^dx and y < 10^dx, so |x − y|
    has at most dx digits, and a sign (0 − 99 = −99: 3 characters for dx = 2)."""
    return max(task.train_digits + task.eval_digits) + 1


def accuracy_report(
    prompts: Sequence[str],
    answers: Sequence[str],
    responses: Sequence[str],
    buckets: Sequence[int] = SEED_BUCKETS,
) -> dict:
    """eval.json's task block: overall exact-match accuracy and accuracy per digit bucket."""
    hits: dict[int, list[bool]] = defaultdict(list)
    for prompt, answer, response in zip(prompts, answers, responses, strict=True):
        x, y = parse_question(prompt)
        hits[bucket_of(x, y, buckets)].append(is_correct(response, answer))
    return bucket_report("subtraction", hits)


# ---- rule rewards for PPO (a `rule` reward source): one float per response ---------------------------------


def _per_question(
    questions: Sequence[str], responses: Sequence[str], score: Callable[[str, str], float]
) -> list[float]:
    """score(difference, response) for each subtraction question; 0.0 for a prompt that holds none."""
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            x, y = parse_question(question)
        except ValueError:
            out.append(0.0)
            continue
        out.append(score(str(x - y), response))
    return out


def subtraction_exact(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for the exact difference (seed 000's scoring), 0.0 otherwise; 0.0 for a prompt that
    holds no subtraction question."""
    return _per_question(questions, responses, lambda answer, given: float(is_correct(given, answer)))


def subtraction_digits(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Partial credit: the share of the difference's characters (sign and digits, aligned from the
    units digit) that the response has right, over the longer of the two; 1.0 only for the exact
    difference, 0.0 for a prompt that holds no subtraction question. A denser signal than exact
    match: an answer with one digit wrong scores above one with all of them wrong."""

    def share_right(answer: str, given: str) -> float:
        given = given.strip()
        same = sum(a == b for a, b in zip(reversed(answer), reversed(given), strict=False))
        return same / max(len(answer), len(given))

    return _per_question(questions, responses, share_right)


# ---- the same, as reward functions (`{kind: function, function: "rlhf.tasks.subtraction:exact_reward"}`):
# chat prompts in, the question read from the last user message (rlhf/reward_functions.py) ------


def exact_reward(prompts: Sequence[list[dict]], responses: Sequence[str], **fields) -> list[float]:
    """The `subtraction` rule as a reward function: 1.0 for the exact difference, else 0.0."""
    return subtraction_exact([p[-1]["content"] for p in prompts], responses)


def digits_reward(prompts: Sequence[list[dict]], responses: Sequence[str], **fields) -> list[float]:
    """The `subtraction_digits` rule as a reward function: the share of the difference's characters right."""
    return subtraction_digits([p[-1]["content"] for p in prompts], responses)


TASK = Task(
    name="subtraction",
    train_records=train_records,
    eval_records=eval_records,
    test_records=test_records,
    preference_records=pair_records,
    is_correct=is_correct,
    bucket=lambda question: bucket_of(*parse_question(question)),
    score=accuracy_report,
    rules={"subtraction": subtraction_exact, "subtraction_digits": subtraction_digits},
    wrong_kinds=WRONG_KINDS,
    answer_tokens=answer_chars,
    fewshot=True,
    languages=LANGUAGES,
)
