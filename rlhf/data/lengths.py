"""Over-long examples: dropped or truncated (keeping the start), and counted."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlhf.config import DataConfig
from rlhf.data.io import DataError

if TYPE_CHECKING:  # annotations only: PPO reads `context_length` on machines without `datasets`
    from datasets import Dataset

log = logging.getLogger("rlhf.data")

# A tokenizer that states no context (transformers' VERY_LARGE_INTEGER, ~1e30) gets this many tokens.
UNSTATED_CONTEXT = 2048


def context_length(data: DataConfig, tokenizer) -> int:
    """Tokens per example: data.max_length, or the model's context as its tokenizer states it
    (`model_max_length`, from the model's tokenizer_config.json: SmolLM2 8192, the tiny model 512)."""
    if data.max_length is not None:
        return data.max_length
    stated = getattr(tokenizer, "model_max_length", None)
    return int(stated) if stated and stated < 10**9 else UNSTATED_CONTEXT


def limit_length(
    dataset: Dataset,
    max_length: int,
    mode: str,
    columns: Sequence[str] = ("input_ids",),
) -> tuple[Dataset, int]:
    """(dataset, n_over). An example is over-long if any of `columns` (token-id lists) is longer
    than `max_length`. `truncate` cuts every per-token column of such an example to max_length
    (a truncated example left with no trained token is dropped); `drop` removes it."""
    lengths = [max(len(row[c]) for c in columns) for row in dataset.select_columns(list(columns))]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if not over:
        return dataset, 0
    if mode == "drop":
        keep = sorted(set(range(len(dataset))) - set(over))
        _refuse_empty(len(keep), len(dataset), len(over), max_length, mode)
        return dataset.select(keep), len(over)
    per_token = [c for c in dataset.column_names if _is_per_token(dataset, c, columns)]

    def cut(row):
        return {c: row[c][:max_length] for c in per_token}

    dataset = dataset.map(cut, desc="Truncating over-long examples")
    if "labels" in dataset.column_names:
        dataset = dataset.filter(lambda row: any(t != -100 for t in row["labels"][1:]))
    _refuse_empty(len(dataset), len(lengths), len(over), max_length, mode)
    return dataset, len(over)


def warn_overlong(over: int, total: int, what: str, max_length: int, mode: str) -> None:
    """The one warning every training stage gives when `over` of its `total` training `what`
    ("examples", "pairs") were longer than data.max_length (dropped or truncated, as `mode` says)."""
    if over:
        done = "dropped" if mode == "drop" else "truncated"
        log.warning("%d of %d training %s longer than data.max_length=%d were %s", over, total, what, max_length, done)


def _refuse_empty(left: int, total: int, over: int, max_length: int, mode: str) -> None:
    """Nothing left to train on: one line naming the keys to change (the trainer's sampler would
    otherwise stop with `num_samples should be a positive integer value, but got num_samples=0`)."""
    if left > 0:
        return
    what = "dropped" if mode == "drop" else "left with no trained token after truncation"
    raise DataError(
        "data.max_length",
        None,
        f"no training examples left: {over} of {total} are longer than data.max_length={max_length} tokens "
        f"and were {what} (data.overlong={mode}); raise data.max_length"
        + (" or set data.overlong=truncate" if mode == "drop" else ""),
    )


def _is_per_token(dataset: Dataset, column: str, length_columns: Sequence[str]) -> bool:
    """A list column aligned with one of the token-id columns (ids, masks, labels)."""
    first = dataset[0][column]
    return isinstance(first, list) and any(len(first) == len(dataset[0][c]) for c in length_columns)
