"""Built-in tasks with a checker, one module each (see `base.Task`), registered in `TASKS` by name.
A task generates training and held-out data in its own formats, scores generations, and offers
rule rewards for PPO (`RULES`, every task's rules under their own names; `rule_reward` makes one a
reward function).

A new task is a new module that builds a `Task`, plus its line in `TASKS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf.tasks import addition_reversed, constraints, subtraction
from rlhf.tasks.base import Rule, Task, TaskSpec, exact_match

__all__ = [
    "RULES",
    "TASKS",
    "Rule",
    "Task",
    "TaskSpec",
    "bucket_figures",
    "get_task",
    "gold_checker",
    "rule_reward",
    "score_generations",
    "task_preference_records",
    "task_records",
]

TASKS: dict[str, Task] = {
    "subtraction": subtraction.TASK,
    "addition_reversed": addition_reversed.TASK,
    "constraints": constraints.TASK,
}


def _all_rules(tasks: dict[str, Task]) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for task in tasks.values():
        for name, rule in task.rules.items():
            if name in rules:
                raise ValueError(f"rule reward {name!r} of task {task.name!r} is already defined by another task")
            rules[name] = rule
    return rules


# Rule rewards for PPO (a reward source `{kind: rule}`): RULES[name](questions, responses) -> floats.
RULES: dict[str, Rule] = _all_rules(TASKS)


def rule_reward(name: str) -> Callable[..., list[float]]:
    """The rule `name` as an ordinary reward function, `fn(prompts, responses, **fields)` (rlhf/reward_functions.py):
    it reads each chat prompt's last user message, the question the rule checks the response against."""
    rule = RULES[name]

    def reward(prompts: Sequence[list[dict]], responses: Sequence[str], **fields) -> list[float]:
        return rule([p[-1]["content"] for p in prompts], responses)

    return reward


def get_task(name: str | None) -> Task:
    """The registered task called `name`; ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"no built-in task {name!r}; known: {sorted(TASKS)} (or set data.train / data.eval)")
    return TASKS[name]


def gold_checker(task_name: str | None) -> Callable[[str, str], bool]:
    """(response, reference answer) -> right?: the task's checker, or plain exact match without a task."""
    return get_task(task_name).is_correct if task_name is not None else exact_match


def task_records(task: TaskSpec, split: str, seed_offset: int = 0) -> list[dict]:
    """Generated records for `split` ("train": SFT records, prompt-only for a task that is not
    `imitable`; "eval", the validation split, and
    "test": {"prompt", "answer"}), in the task's formats. Training items depend on data_seed +
    seed_offset (PPO draws fresh prompts with an offset) and never include a test item."""
    t = get_task(task.name)
    if split == "train":
        return t.train_records(task, seed_offset)
    return t.test_records(task) if split == "test" else t.eval_records(task)


def task_preference_records(
    task: TaskSpec, kinds: Sequence[str] | None, size: int, split: str, weights: Sequence[float] | None = None
) -> list[dict]:
    """Generated chosen/rejected pairs for `split` ("train" or "eval"): the right answer against a
    realistic wrong one of a kind in `kinds` (None: all the task's kinds), drawn by `weights`."""
    t = get_task(task.name)
    return t.preference_records(task, t.wrong_kinds if kinds is None else kinds, size, split, weights)


def bucket_figures(report: dict) -> tuple[dict, dict, dict, Callable[[str], str]]:
    """A task report's per-bucket accuracy, standard error and count, and each bucket's name: digit
    buckets (`accuracy_by_digits`, "5-digit") or named kinds (`accuracy_by_kind`, e.g. "lowercase").
    Empty for a report without buckets."""
    for by, name in (("digits", lambda d: f"{d}-digit"), ("kind", str)):
        if isinstance(report.get(f"accuracy_by_{by}"), dict):
            return report[f"accuracy_by_{by}"], report.get(f"stderr_by_{by}", {}), report.get(f"n_by_{by}", {}), name
    return {}, {}, {}, str


def score_generations(task_name: str | None, prompts: list[str], answers: list[str], responses: list[str]) -> dict:
    """Task metrics for generations: the task's report (overall and per bucket), or plain exact
    match when there is no task."""
    if task_name is not None:
        return get_task(task_name).score(prompts, answers, responses)
    hits = [exact_match(r, a) for r, a in zip(responses, answers, strict=True)]
    return {"task": task_name, "accuracy": round(sum(hits) / max(len(hits), 1), 4), "n": len(hits)}
