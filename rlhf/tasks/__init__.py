"""Built-in tasks with a checker. A task generates training and held-out data in its own
formats, scores generations, and can serve as a rule-based reward in PPO."""

from __future__ import annotations

import random

from rlhf.config import TaskConfig
from rlhf.data.io import Record
from rlhf.tasks import subtraction

TASKS = ("subtraction",)


def task_records(task: TaskConfig, split: str, seed_offset: int = 0) -> list[Record]:
    """Generated records for `split` ("train" or "eval"), in the seed's file formats. Training
    items depend on data_seed + seed_offset (PPO draws fresh prompts with an offset)."""
    if task.name != "subtraction":
        raise ValueError(f"no built-in data for task {task.name!r}; set data.train / data.eval")
    if split == "train":
        seed = task.data_seed + seed_offset
        items = subtraction.train_items(task.train_size, task.train_digits, task.train_weights, seed)
        records = [subtraction.sft_record(x, y, fewshot=task.fewshot) for _, x, y in items]
    else:
        items = subtraction.test_items(task.eval_size, task.eval_digits, task.data_seed + 1)
        records = [_eval_record(x, y, task.fewshot) for _, x, y in items]
    return [Record(r, f"task:{task.name}/{split} item {i + 1}") for i, r in enumerate(records)]


def task_preference_records(task: TaskConfig, kinds, size: int, split: str, weights=None) -> list[Record]:
    """Generated chosen/rejected pairs for `split` ("train" or "eval"): the right answer against
    a realistic wrong one (see subtraction.wrong_answer), its kind drawn by `weights`."""
    if task.name != "subtraction":
        raise ValueError(f"no built-in preference pairs for task {task.name!r}; set data.train / data.eval")
    if split == "train":
        items = subtraction.train_items(size, task.train_digits, task.train_weights, task.data_seed + 10)
    else:
        items = subtraction.test_items(size, task.eval_digits, task.data_seed + 11)
    rng = random.Random(task.data_seed + (10 if split == "train" else 11))
    records = [r for _, x, y in items if (r := subtraction.preference_record(x, y, kinds, rng, task.fewshot, weights))]
    return [Record(r, f"task:{task.name}/{split}-pairs item {i + 1}") for i, r in enumerate(records)]


def _eval_record(x: int, y: int, fewshot: bool) -> dict:
    if fewshot:
        return {"prompt": subtraction.FEWSHOT_PROMPT % (x, y), "answer": str(x - y)}
    return subtraction.test_record(x, y)


def score_generations(task_name: str | None, prompts: list[str], answers: list[str], responses: list[str]) -> dict:
    """Task metrics for generations: exact match overall and per digit bucket."""
    if task_name == "subtraction":
        return subtraction.accuracy_report(prompts, answers, responses)
    hits = [r.strip() == a.strip() for r, a in zip(responses, answers, strict=True)]
    return {"task": task_name, "accuracy": round(sum(hits) / max(len(hits), 1), 4), "n": len(hits)}
