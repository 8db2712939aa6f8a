"""Data loading and format normalisation for every stage; errors name file, line and field."""

from __future__ import annotations

from collections.abc import Callable

from rlhf.config import DataConfig, TaskConfig
from rlhf.data.io import DataError, Record, read_records
from rlhf.data.preference import normalize_preferences
from rlhf.data.sft import detect_sft_format, normalize_sft, reference_answer
from rlhf.tasks import task_records

__all__ = [
    "DataError",
    "Record",
    "detect_sft_format",
    "load_records",
    "normalize_preferences",
    "normalize_sft",
    "read_records",
    "reference_answer",
]


def load_records(
    data: DataConfig, task: TaskConfig, split: str, generate: Callable[[], list[dict]] | None = None
) -> tuple[list[Record], str]:
    """Records for "train" or "eval" and a label saying where they came from: the configured
    file / dataset, or, when the config leaves it null, the task's generated set (`generate`,
    e.g. the task's preference pairs; by default its SFT / held-out data)."""
    source = data.train if split == "train" else data.eval
    if source is None:
        if task.name is None:
            if split == "eval":
                return [], "none"
            raise DataError("data.train", None, "no training data: set data.train or a built-in task")
        label = f"task:{task.name}/{split}"
        generated = generate() if generate else task_records(task, split)
        return [Record(r, f"{label} item {i + 1}") for i, r in enumerate(generated)], label
    records = read_records(source, data.train_split if split == "train" else data.eval_split)
    if split == "eval" and data.max_eval_examples is not None:
        records = records[: data.max_eval_examples]
    if not records:
        raise DataError(source, None, "holds no records")
    return records, source
