"""Over-long examples: dropped or truncated (keeping the start), and counted."""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset


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
        return dataset.select(keep), len(over)
    per_token = [c for c in dataset.column_names if _is_per_token(dataset, c, columns)]

    def cut(row):
        return {c: row[c][:max_length] for c in per_token}

    dataset = dataset.map(cut, desc="Truncating over-long examples")
    if "labels" in dataset.column_names:
        dataset = dataset.filter(lambda row: any(t != -100 for t in row["labels"][1:]))
    return dataset, len(over)


def _is_per_token(dataset: Dataset, column: str, length_columns: Sequence[str]) -> bool:
    """A list column aligned with one of the token-id columns (ids, masks, labels)."""
    first = dataset[0][column]
    return isinstance(first, list) and any(len(first) == len(dataset[0][c]) for c in length_columns)
