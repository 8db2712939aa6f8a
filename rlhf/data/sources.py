"""Data the way users have it, made into the records the format normalisers read: several sources
mixed by weight, and columns with other names mapped onto the ones the formats use."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from rlhf.data.io import DataError, Record

MIX_SEED = 0  # which records a fractional weight takes: fixed, so a resumed run reads the same data


def mix(sources: Sequence[list[Record]], weights: Sequence[float] | None) -> list[Record]:
    """The records of several sources, in source order. A weight w takes round(w · n) of a source's
    n records (open-instruct's dataset_mixer): 1 all, 0.5 a fixed random half, 2 every record
    twice; whole copies first, then a random part. No weights: every record once."""
    if weights is None:
        return [r for records in sources for r in records]
    out: list[Record] = []
    for records, weight in zip(sources, weights, strict=True):
        copies, part = divmod(round(weight * len(records)), len(records)) if records else (0, 0)
        order = list(range(len(records)))
        random.Random(MIX_SEED).shuffle(order)
        out += records * copies + [records[i] for i in sorted(order[:part])]
    return out


def map_columns(records: Sequence[Record], columns: Mapping[str, str]) -> list[Record]:
    """Each record with the columns named in `columns` ({format field: the data's column}, e.g.
    {prompt: question}) renamed to the field. A record that lacks one of those columns, or holds
    both a column and the field it maps onto, stops with its file, line and column."""
    if not columns:
        return list(records)
    out = []
    for record in records:
        data = dict(record.data)
        for field, column in columns.items():
            if column not in data:
                raise DataError(record.where, column, f"missing (data.columns maps it to '{field}')")
            if field in data and field != column:
                raise DataError(
                    record.where, field, f"present beside '{column}', which data.columns maps onto it; keep one"
                )
            data[field] = data.pop(column)
        out.append(Record(data, record.where))
    return out
