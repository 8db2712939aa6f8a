"""What a built-in task is: one module that fills in a `Task` of plain functions and values.

The task package is a leaf: it imports nothing else from `rlhf`, so the config can import the
registry to validate names and the data loader can call the generators, without loops. A task's
functions read the task config by attribute (`TaskSpec` below), which `rlhf.config.TaskConfig`
satisfies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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
    fewshot: bool
    data_seed: int


@dataclass(frozen=True)
class Task:
    """A built-in task: its data, its checker (the gold measure) and what reports and rewards use.

    Generated data depends on the task config's `data_seed` only, never on the run's `seed`.
    """

    name: str
    # (task config, seed offset) -> SFT records {"messages": [user, assistant]}; PPO draws its
    # prompts with an offset so they differ from the SFT set
    train_records: Callable[[TaskSpec, int], list[dict]]
    # (task config) -> held-out records {"prompt", "answer"}
    eval_records: Callable[[TaskSpec], list[dict]]
    # (task config, kinds, size, split, weights per kind | None) -> {"prompt", "chosen", "rejected", "kind"}
    preference_records: Callable[[TaskSpec, Sequence[str], int, str, Sequence[float] | None], list[dict]]
    is_correct: Callable[[str, str], bool]  # (response, reference answer) -> right?
    # (questions, reference answers, responses) -> eval.json's task block: at least task, accuracy, n,
    # and accuracy_by_digits / n_by_digits for a task with buckets
    score: Callable[[Sequence[str], Sequence[str], Sequence[str]], dict]
    rules: Mapping[str, Rule]  # rule rewards for PPO's reward.rules, by name (unique across tasks)
    wrong_kinds: tuple[str, ...]  # kinds of wrong answers for the reward model's pairs
    # (task config) -> the most tokens a right answer takes, before the end of turn: one per character
    # of the longest one (a digit or a sign is one token, or part of one, in every tokenizer the
    # presets use); on-policy RM pairs sample that many, plus slack (stages/reward/pairs.py)
    answer_tokens: Callable[[TaskSpec], int]
    # extra report lines: (plot name in rlhf.report.CURVES, metric key, label)
    curves: tuple[tuple[str, str, str], ...] = ()
    fewshot: bool = False  # whether the generators honour task.fewshot


def exact_match(response: str, answer: str) -> bool:
    """Exact match of the answer, ignoring surrounding white space (seed 000's scoring)."""
    return response.strip() == str(answer).strip()


def bucket_report(task: str, hits: Mapping[int, Sequence[bool]]) -> dict:
    """eval.json's task block from exact-match hits per digit bucket: accuracy overall and per
    bucket, and the counts (every task reports in this shape; the report reads it)."""
    flat = [h for v in hits.values() for h in v]
    return {
        "task": task,
        "accuracy": round(sum(flat) / max(len(flat), 1), 4),
        "accuracy_by_digits": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(hits.items())},
        "n_by_digits": {str(k): len(v) for k, v in sorted(hits.items())},
        "n": len(flat),
    }
