"""Read raw records from .jsonl / .json / .parquet files, saved HF datasets and hub ids, each
record tagged with where it came from, so that every later error names the file and line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data. The message is one line: `<file>:<line>: field '<field>': <what is wrong>`."""

    def __init__(self, where: str, field: str | None, message: str):
        self.where, self.field, self.message = where, field, message
        field_part = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {field_part}{message}")


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    where: str  # e.g. "data/train.jsonl:12" or "org/name[train] row 5"


def read_records(source: str, split: str = "train") -> list[Record]:
    """All records of a data source, in order."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
            return list(_read_jsonl(path))
        if name.endswith(".json"):
            return _read_json(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
        raise DataError(str(path), None, f"unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}")
    if source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(source, None, "no such file or directory")
    return _read_hub(source, split)


def _read_jsonl(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = ""
                    if "Unterminated string" in e.msg or "Invalid control character" in e.msg:
                        hint = " (a raw newline inside a JSON string? write it as \\n)"
                    raise DataError(where, None, f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
                if not isinstance(obj, dict):
                    raise DataError(where, None, f"expected a JSON object, got {type(obj).__name__}")
                yield Record(obj, where)
    except UnicodeDecodeError as e:
        raise DataError(str(path), None, f"not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(str(path), None, f"cannot read: {e.strerror or e}") from None


def _read_json(path: Path) -> list[Record]:
    """A JSON array of objects (a file of JSON lines named .json is read as JSON lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, f"cannot read: {e}") from None
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        return list(_read_jsonl(path))
    decoder = json.JSONDecoder()
    records, pos, line = [], start + 1, text.count("\n", 0, start + 1) + 1
    while True:
        skipped = _skip(text, pos, " \t\r\n")
        line += text.count("\n", pos, skipped)
        pos = skipped
        if pos < len(text) and text[pos] == "]":
            return records
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", None, f"invalid JSON: {e.msg} at column {e.colno}") from None
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise DataError(where, None, f"expected a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, where))
        line += text.count("\n", pos, end)
        pos = _skip(text, end, " \t\r\n")
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{lineno}", None, "invalid JSON: expected ',' or ']' between records")


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(str(path), None, f"cannot read parquet: {e}") from None
    return [Record(row, f"{path} row {i + 1}") for i, row in enumerate(rows)]


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(path), None, f"not a saved Hugging Face dataset (save_to_disk): {e}") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(str(path), None, f"no split '{split}'; it has {sorted(ds)}")
        ds, label = ds[split], f"{path}[{split}]"
    else:
        label = str(path)
    return [Record(row, f"{label} row {i + 1}") for i, row in enumerate(ds)]


def _read_hub(name: str, split: str) -> list[Record]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (offline, missing split, bad repo)
        raise DataError(name, None, f"not a local file and cannot load it from the hub: {e}") from None
    return [Record(row, f"{name}[{split}] row {i + 1}") for i, row in enumerate(ds)]
