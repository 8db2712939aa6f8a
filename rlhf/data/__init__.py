"""Data loading and format normalisation for every stage; errors name file, line and field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlhf.config import DataConfig, TaskConfig
from rlhf.data.io import DataError, Record, read_records
from rlhf.data.preference import normalize_preferences
from rlhf.data.sft import detect_sft_format, normalize_sft, reference_answer
from rlhf.data.sources import map_columns, mix
from rlhf.tasks import get_task, task_records
from rlhf.tasks.base import BucketExhausted

__all__ = [
    "DataError",
    "HeldOut",
    "Record",
    "detect_sft_format",
    "load_held_out",
    "load_records",
    "normalize_preferences",
    "normalize_sft",
    "read_records",
    "reference_answer",
]


def load_records(
    data: DataConfig, task: TaskConfig, split: str, generate: Callable[[], list[dict]] | None = None
) -> tuple[list[Record], str]:
    """Records for "train", "eval" (the validation split) or "test" and a label saying where they
    came from: the configured file / dataset, or, when the config leaves it null, the task's
    generated set (`generate`, e.g. the task's preference pairs; by default its SFT / held-out
    data). No test split without a task, or with task.test_per_bucket 0."""
    source = {"train": data.train, "eval": data.eval, "test": data.test}[split]
    if source is None:
        if task.name is None or (split == "test" and task.test_per_bucket == 0):
            if split != "train":
                return [], "none"
            raise DataError("data.train", None, "no training data: set data.train or a built-in task")
        label = f"task:{task.name}/{split}"
        if split == "train" and generate is None and not get_task(task.name).imitable:
            raise DataError(
                "data.train",
                None,
                f"task {task.name!r} has no reference answers to train on: give your data, e.g. the model's own "
                "passing answers (the label stage's best.jsonl; a pipeline with stages [label, sft, ...] wires it)",
            )
        try:
            generated = generate() if generate else task_records(task, split)
        except BucketExhausted as e:
            raise DataError(label, None, str(e)) from None
        return [Record(r, f"{label} item {i + 1}") for i, r in enumerate(generated)], label
    sources = (source,) if isinstance(source, str) else source
    name = {"train": data.train_split, "eval": data.eval_split, "test": data.test_split}[split]
    per_source = [read_records(s, name, data.dataset_config) for s in sources]
    for s, records in zip(sources, per_source, strict=True):
        if not records:
            raise DataError(s, None, "holds no records")
    records = map_columns(mix(per_source, data.train_weights if split == "train" else None), data.columns)
    if split == "eval" and data.max_eval_examples is not None:
        records = records[: data.max_eval_examples]
    if not records:  # every weight rounded to none
        raise DataError(" + ".join(sources), None, "data.train_weights leave no records")
    return records, " + ".join(sources)


@dataclass(kw_only=True)
class HeldOut:
    """The two held-out splits of prompts with answers. Validation: in-loop evaluation, the choice
    of a checkpoint, any tuning. Test: quoted in eval.json, the report and the summary, and used by
    nothing else. Either may be empty."""

    validation: list[dict]  # normalised examples {"prompt": [messages], "completion": [messages]}
    test: list[dict]
    validation_source: str  # where they came from, e.g. "task:subtraction/eval" or a file
    test_source: str

    def describe(self) -> str:
        """For the log: how many of each, from where."""
        return (
            f"validation {len(self.validation)} from {self.validation_source}, "
            f"test {len(self.test)} from {self.test_source}"
        )


def load_held_out(data: DataConfig, task: TaskConfig) -> HeldOut:
    """Both held-out splits: data.eval / data.test, or the task's generated ones when null."""
    validation, validation_source = load_records(data, task, "eval")
    test, test_source = load_records(data, task, "test")
    return HeldOut(
        validation=normalize_sft(validation)[0] if validation else [],
        test=normalize_sft(test)[0] if test else [],
        validation_source=validation_source,
        test_source=test_source,
    )
