"""Addition with the sum written in reverse (units digit first): `57 + 68 =` -> `521`.

Writing the sum least significant digit first lets a left-to-right decoder produce each digit
from the two operand digits and the carry it has just produced, instead of having to know every
carry before its first token; small transformers learn it far more easily (Lee et al. 2023,
"Teaching Arithmetic to Small Transformers", sec. 4). The second built-in task, and the template
for a new one: generators, checker, report, rule rewards and wrong answers in one module.

Items of a bucket of `d` digits have an x of exactly d digits and a y of 1..d digits, so the
bucket is read back from the prompt exactly (the longer operand's length).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from functools import lru_cache, partial

from rlhf.tasks.base import Task, TaskSpec, bucket_report, draw_unreserved, exact_match

# Short on purpose: with the tiny tokenizer a 4-digit item is 10 prompt tokens (" + " and " =" are
# single tokens, digits one each); the task's name, not the prompt, says the answer is reversed.
PROMPT = "%d + %d ="
_QUESTION = re.compile(r"(\d+) \+ (\d+) =")
WRONG_KINDS = ("wrong_digit", "missed_carry", "not_reversed", "dropped_digit")


def answer_of(x: int, y: int) -> str:
    """The sum's digits, units first: 57 + 68 = 125 -> "521"; 10 + 20 = 30 -> "03"."""
    return str(x + y)[::-1]


def sample_item(rng: random.Random, d: int) -> tuple[int, int]:
    """(x, y) for a bucket of d digits: x of exactly d digits (0..9 for d = 1), y of 1..d digits."""
    x = rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d)
    dy = rng.randint(1, d)
    y = rng.randrange(10**dy)
    return x, y


def answer_chars(task: TaskSpec) -> int:
    """Characters of the longest answer for this config: x, y < 10^d, so x + y < 2·10^d has at
    most d + 1 digits (99 + 99 = 198 -> "891")."""
    return max(task.train_digits + task.eval_digits) + 1


def bucket_of(x: int, y: int) -> int:
    return max(len(str(x)), len(str(y)))


def items(
    n: int,
    digits: Sequence[int],
    weights: Sequence[float] | None,
    seed: int,
    exclude: Container[tuple[int, int]] = frozenset(),
) -> list[tuple[int, int]]:
    """n items, the bucket of each drawn from `digits` by `weights` (uniform if None); an item in
    `exclude` is skipped and its bucket drawn again (nothing excluded: the same stream as ever)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = rng.choices(digits, weights=weights)[0]
        out.append(draw_unreserved(partial(sample_item, rng, d), exclude, d))
    return out


def even_items(
    n: int, digits: Sequence[int], seed: int, exclude: Container[tuple[int, int]] = frozenset()
) -> list[tuple[int, int]]:
    """n items split evenly over `digits`, in order (the held-out layout); `exclude` as in `items`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = digits[i * len(digits) // n]
        out.append(draw_unreserved(partial(sample_item, rng, d), exclude, d))
    return out


def test_split_items(task: TaskSpec) -> list[tuple[int, int]]:
    """The test split: test_per_bucket items in each bucket of eval_digits, drawn with test_seed,
    none of them a validation item (and `reserved` keeps them out of every training set)."""
    return list(
        _test_split(task.eval_size, tuple(task.eval_digits), task.data_seed, task.test_per_bucket, task.test_seed)
    )


@lru_cache(maxsize=8)
def _test_split(eval_size, eval_digits, data_seed, per_bucket, test_seed) -> tuple[tuple[int, int], ...]:
    seen = frozenset(even_items(eval_size, eval_digits, data_seed + 1))
    return tuple(even_items(per_bucket * len(eval_digits), eval_digits, test_seed, exclude=seen))


def reserved(task: TaskSpec) -> frozenset[tuple[int, int]]:
    """The test split's items: no generated training item or pair is one of them."""
    return frozenset(test_split_items(task))


def parse_question(prompt: str) -> tuple[int, int]:
    """(x, y) of the question in a prompt; ValueError if there is none."""
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"no reversed-addition question in prompt: {prompt[:80]!r}")
    return int(match.group(1)), int(match.group(2))


# ---- generators ------------------------------------------------------------------------------


def train_records(task: TaskSpec, seed_offset: int = 0) -> list[dict]:
    """SFT records {"messages": [user, assistant]}, from data_seed + seed_offset; no test-split item."""
    pairs = items(task.train_size, task.train_digits, task.train_weights, task.data_seed + seed_offset, reserved(task))
    return [
        {"messages": [{"role": "user", "content": PROMPT % (x, y)}, {"role": "assistant", "content": answer_of(x, y)}]}
        for x, y in pairs
    ]


def eval_records(task: TaskSpec) -> list[dict]:
    """The validation split {"prompt", "answer"}, split evenly over eval_digits, from data_seed + 1."""
    return [
        {"prompt": PROMPT % (x, y), "answer": answer_of(x, y)}
        for x, y in even_items(task.eval_size, task.eval_digits, task.data_seed + 1)
    ]


def test_records(task: TaskSpec) -> list[dict]:
    """The test split {"prompt", "answer"}, from test_seed (see `test_split_items`)."""
    return [{"prompt": PROMPT % (x, y), "answer": answer_of(x, y)} for x, y in test_split_items(task)]


def wrong_answer(x: int, y: int, kind: str, rng: random.Random) -> str | None:
    """A realistic wrong (reversed) answer of the given kind, or None if the kind does not apply.

    - wrong_digit: one digit of the answer replaced by another;
    - missed_carry: a carry forgotten (the sum too small by 10^(k+1) for a carry out of column k);
    - not_reversed: the right sum written most significant digit first;
    - dropped_digit: one digit of the answer left out.
    """
    right = answer_of(x, y)
    if kind == "wrong_digit":
        i = rng.randrange(len(right))
        out = right[:i] + rng.choice([d for d in "0123456789" if d != right[i]]) + right[i + 1 :]
    elif kind == "missed_carry":
        carries = _carry_columns(x, y)
        if not carries:
            return None
        out = str(x + y - 10 ** (rng.choice(carries) + 1))[::-1]
    elif kind == "not_reversed":
        out = str(x + y)
    elif kind == "dropped_digit":
        if len(right) < 2:
            return None
        i = rng.randrange(len(right))
        out = right[:i] + right[i + 1 :]
    else:
        raise ValueError(f"unknown kind of wrong answer {kind!r}; expected one of {WRONG_KINDS}")
    return None if out == right else out


def _carry_columns(x: int, y: int) -> list[int]:
    """Columns (0 = units) whose digit sum carries into the next column."""
    cols, carry, k = [], 0, 0
    while x or y:
        carry = int(x % 10 + y % 10 + carry >= 10)
        if carry:
            cols.append(k)
        x, y, k = x // 10, y // 10, k + 1
    return cols


def pair_records(
    task: TaskSpec, kinds: Sequence[str], size: int, split: str, weights: Sequence[float] | None = None
) -> list[dict]:
    """Pairs {"prompt", "chosen", "rejected", "kind"}: the right answer against a wrong one of a
    kind drawn by `weights` (uniform if None) from those that apply; from data_seed + 10 / + 11,
    no test-split item among them."""
    offset = 10 if split == "train" else 11
    if split == "train":
        drawn = items(size, task.train_digits, task.train_weights, task.data_seed + offset, reserved(task))
    else:
        drawn = even_items(size, task.eval_digits, task.data_seed + offset, reserved(task))
    rng = random.Random(task.data_seed + offset)
    out = []
    for x, y in drawn:
        options = list(kinds)
        chances = list(weights) if weights is not None else [1.0] * len(options)
        while options:
            kind = rng.choices(options, weights=chances)[0]
            chances.pop(options.index(kind))
            options.remove(kind)
            wrong = wrong_answer(x, y, kind, rng)
            if wrong is not None:
                out.append({"prompt": PROMPT % (x, y), "chosen": answer_of(x, y), "rejected": wrong, "kind": kind})
                break
    return out


# ---- scoring and rule rewards ----------------------------------------------------------------


def accuracy_report(questions: Sequence[str], answers: Sequence[str], responses: Sequence[str]) -> dict:
    """eval.json's task block: exact-match accuracy overall and per digit bucket."""
    hits: dict[int, list[bool]] = defaultdict(list)
    for question, answer, response in zip(questions, answers, responses, strict=True):
        hits[bucket_of(*parse_question(question))].append(exact_match(response, answer))
    return bucket_report("addition_reversed", hits)


def _per_question(questions: Sequence[str], responses: Sequence[str], score: Callable[[str, str], float]) -> list:
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            out.append(score(answer_of(*parse_question(question)), response.strip()))
        except ValueError:  # a prompt that holds no question scores 0
            out.append(0.0)
    return out


def exact_rule(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for the exact reversed sum, 0.0 otherwise (and for a prompt that holds no question)."""
    return _per_question(questions, responses, lambda answer, given: float(given == answer))


def digits_rule(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Partial credit: the share of the answer's digits right, aligned from the first (units)
    digit, over the longer of answer and response; 1.0 only for the exact answer."""
    return _per_question(
        questions,
        responses,
        lambda answer, given: sum(a == b for a, b in zip(answer, given, strict=False)) / max(len(answer), len(given)),
    )


TASK = Task(
    name="addition_reversed",
    train_records=train_records,
    eval_records=eval_records,
    test_records=test_records,
    preference_records=pair_records,
    is_correct=exact_match,
    bucket=lambda question: bucket_of(*parse_question(question)),
    score=accuracy_report,
    rules={"addition_reversed": exact_rule, "addition_reversed_digits": digits_rule},
    wrong_kinds=WRONG_KINDS,
    answer_tokens=answer_chars,
)
