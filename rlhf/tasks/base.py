"""What a built-in task is: one module that fills in a `Task` of plain functions and values.

The task package is a leaf: it imports nothing else from `rlhf`, so the config can import the
registry to validate names and the data loader can call the generators, without loops. A task's
functions read the task config by attribute (`TaskSpec` below), which `rlhf.config.TaskConfig`
satisfies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# A rule reward: the prompts' last user message and the responses -> one float per response.
Rule = Callable[[Sequence[str], Sequence[str]], list[float]]


class TaskSpec(Protocol):
    """The fields of `rlhf.config.TaskConfig` that a task's generators read."""

    name: str | None
    train_size: int
    train_digits: tuple[int, ...]
    train_weights: tuple[float, ...] | None
    eval_size: int
    eval_digits: tuple[int, ...]
    test_per_bucket: int
    test_seed: int
    fewshot: bool
    prompt_language: str
    data_seed: int


@dataclass(frozen=True)
class Task:
    """A built-in task: its data, its checker (the gold measure) and what reports and rewards use.

    Generated data depends on the task config's `data_seed` only, never on the run's `seed`.
    """

    name: str
    # (task config, seed offset) -> SFT records {"messages": [user, assistant]} (a task that is not
    # `imitable`: prompt-only {"prompt": [user], "answer"}); PPO draws its prompts with an offset so
    # they differ from the SFT set
    train_records: Callable[[TaskSpec, int], list[dict]]
    # (task config) -> the validation split's records {"prompt", "answer"} (in-loop evaluation, tuning)
    eval_records: Callable[[TaskSpec], list[dict]]
    # (task config) -> the test split's records {"prompt", "answer"}: drawn with task.test_seed, no
    # validation item among them, and left out of every generated training set (`draw_unreserved`)
    test_records: Callable[[TaskSpec], list[dict]]
    # (task config, kinds, size, split, weights per kind | None) -> {"prompt", "chosen", "rejected", "kind"}
    preference_records: Callable[[TaskSpec, Sequence[str], int, str, Sequence[float] | None], list[dict]]
    is_correct: Callable[[str, str], bool]  # (response, reference answer) -> right?
    bucket: Callable[[str], int | str]  # question -> its bucket as `score` keys it (digits; constraints: the kind)
    # (questions, reference answers, responses) -> eval.json's task block: at least task, accuracy, n,
    # and accuracy_by_digits / n_by_digits for a task with digit buckets (accuracy_by_kind / n_by_kind
    # for one with kinds, `bucket_report`)
    score: Callable[[Sequence[str], Sequence[str], Sequence[str]], dict]
    rules: Mapping[str, Rule]  # rule rewards for PPO's `rule` reward sources, by name (unique across tasks)
    wrong_kinds: tuple[str, ...]  # kinds of wrong answers for the reward model's pairs
    # (task config) -> the most tokens a right answer takes, before the end of turn: one per character
    # of the longest one (a digit or a sign is one token, or part of one, in every tokenizer the
    # presets use); on-policy RM pairs sample that many, plus slack (stages/reward/pairs.py)
    answer_tokens: Callable[[TaskSpec], int]
    # extra report lines: (plot name in rlhf.report.CURVES, metric key, label)
    curves: tuple[tuple[str, str, str], ...] = ()
    fewshot: bool = False  # whether the generators honour task.fewshot
    languages: tuple[str, ...] = ()  # the prompt languages the generators honour (task.prompt_language)
    # the generated training records hold a reference answer SFT can train on; False: prompt-only
    # records (the constraints task: its SFT data comes from rejection sampling of the model's own samples)
    imitable: bool = True


def exact_match(response: str, answer: str) -> bool:
    """Exact match of the answer, ignoring surrounding white space (seed 000's scoring)."""
    return response.strip() == str(answer).strip()


def bucket_report(
    task: str, hits: Mapping[int, Sequence[bool]] | Mapping[str, Sequence[bool]], by: str = "digits"
) -> dict:
    """eval.json's task block from hits per bucket: accuracy overall and per bucket, one standard
    error of each, and the counts (every task reports in this shape; the report reads it). The
    per-bucket keys are `accuracy_by_<by>`, `stderr_by_<by>`, `n_by_<by>`: digit buckets for the
    arithmetic tasks, constraint kinds (`by="kind"`) for the constraints task.

    A bucket's standard error is the binomial sqrt(p(1 − p)/n). The buckets are fixed strata (the
    held-out sets split evenly over them), so the overall one is the stratified
    sqrt(Σ n_b·p_b(1 − p_b)) / N, not sqrt(p(1 − p)/N), which would count the gap between buckets
    as sampling noise."""
    flat = [h for v in hits.values() for h in v]
    rates = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    spread = sum(len(hits[k]) * p * (1 - p) for k, p in rates.items())
    return {
        "task": task,
        "accuracy": round(sum(flat) / max(len(flat), 1), 4),
        "stderr": round(math.sqrt(spread) / max(len(flat), 1), 4),
        f"accuracy_by_{by}": {str(k): round(p, 4) for k, p in rates.items()},
        f"stderr_by_{by}": {str(k): round(standard_error(p, len(hits[k])), 4) for k, p in rates.items()},
        f"n_by_{by}": {str(k): len(v) for k, v in sorted(hits.items())},
        "n": len(flat),
    }


def standard_error(p: float, n: int) -> float:
    """One binomial standard error of an accuracy p measured on n items: sqrt(p(1 − p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


T = TypeVar("T")
# Redraws before a bucket is declared used up: with 1-digit operands a 1,000-item test split can
# hold every item there is, and training could then never draw one.
MAX_REDRAWS = 10_000


class BucketExhausted(ValueError):
    """Every draw of a bucket was a reserved (held-out) item."""


def draw_unreserved(draw: Callable[[], T], reserved: Container[T], bucket: int) -> T:
    """The next item of `draw` that is not in `reserved` (the test split's items, which no other
    generated set may hold; reserved ones are skipped, so without any the stream is unchanged)."""
    for _ in range(MAX_REDRAWS):
        item = draw()
        if item not in reserved:
            return item
    raise BucketExhausted(
        f"{MAX_REDRAWS} draws in a row for the {bucket}-digit bucket were test or validation items: the held-out "
        "splits hold (nearly) every item of that bucket; lower task.test_per_bucket or task.eval_size, or drop the "
        "bucket from task.eval_digits"
    )
