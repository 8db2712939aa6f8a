"""Read raw records from .jsonl / .json / .parquet files, saved HF datasets and hub ids, each
record tagged with where it came from, so that every later error names the file and line."""

from __future__ import annotations

import gzip
import json
import os
import re
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


def read_records(source: str, split: str = "train", config_name: str | None = None) -> list[Record]:
    """All records of a data source, in order; `config_name` picks a hub dataset's configuration."""
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
    if _looks_like_a_path(source):
        raise DataError(source, None, "no such file or directory")
    return _read_hub(source, split, config_name)


# A hub dataset id: `name` or `owner/name`, letters, digits, '-', '_', '.' (huggingface_hub's rule).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_a_path(source: str) -> bool:
    """A missing local path fails at once instead of after the hub's retries."""
    if source.startswith((".", "/", "~")) or source.lower().endswith((*FILE_SUFFIXES, ".gz")):
        return True
    has_sep = os.sep in source or (os.altsep is not None and os.altsep in source)
    return has_sep and not HUB_ID.fullmatch(source)


def _json_object(line: str, where: str) -> dict:
    """One JSON object, with the errors that a hand-made file holds turned into one line."""
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        hint = ""
        if "Unterminated string" in e.msg or "Invalid control character" in e.msg:
            hint = " (a raw newline inside a JSON string? write it as \\n)"
        raise DataError(where, None, f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
    except _DuplicateKey as e:
        raise DataError(
            where, str(e), "appears twice in one object; JSON keeps only the last, so fix the line"
        ) from None
    except RecursionError:
        raise DataError(where, None, "invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(where, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys silently (e.g. two "answer"s after a bad merge);
    # refuse them like Go's and Rust's strict decoders do, instead of training on half a record.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_jsonl(path: Path) -> Iterator[Record]:
    # Bytes, decoded line by line, so that a bad byte or a truncated .gz names its line.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows editors) is fine
                if line.strip():
                    where = f"{path}:{lineno}"
                    yield Record(_json_object(line, where), where)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}", None, f"not UTF-8 text (byte {e.object[e.start]:#04x} at column {e.start + 1})"
        ) from None
    except EOFError:  # gzip: the compressed stream stops before its end marker
        raise DataError(
            f"{path}:{lineno + 1}", None, "the compressed file is truncated (an interrupted copy?)"
        ) from None
    except OSError as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}:{lineno + 1}", None, f"cannot read: {e.strerror or e}") from None


def _read_json(path: Path) -> list[Record]:
    """A JSON array of objects (a file of JSON lines named .json is read as JSON lines)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(str(path), None, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}", None, f"not UTF-8 text (byte {data[e.start]:#04x})") from None
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        return list(_read_jsonl(path))
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
    records, pos, line = [], start + 1, text.count("\n", 0, start + 1) + 1
    while True:
        skipped = _skip(text, pos, " \t\r\n")
        line += text.count("\n", pos, skipped)
        pos = skipped
        if pos < len(text) and text[pos] == "]":
            return records
        where = f"{path}:{line}"
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", None, f"invalid JSON: {e.msg} at column {e.colno}") from None
        except _DuplicateKey as e:
            raise DataError(where, str(e), "appears twice in one object; JSON keeps only the last") from None
        except RecursionError:
            raise DataError(where, None, "invalid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(where, None, f"expected a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, where))
        line += text.count("\n", pos, end)
        pos = _skip(text, end, " \t\r\n")
        line += text.count("\n", end, pos)  # a newline before the comma
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


def _read_hub(name: str, split: str, config_name: str | None) -> list[Record]:
    from datasets import load_dataset

    label = f"{name}[{config_name}]" if config_name else name
    try:
        ds = load_dataset(name, config_name, split=split)
    except Exception as e:  # datasets raises many types (offline, missing split, bad repo)
        if _offline():  # the hub's own message is a page of retries; this is what to do
            raise DataError(
                label,
                None,
                "not a local file or directory, and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                "with no cached copy: give a .jsonl/.parquet file or a save_to_disk directory, or load it once online",
            ) from None
        raise DataError(label, None, f"not a local file and cannot load it from the hub: {e}") from None
    return [Record(row, f"{label}[{split}] row {i + 1}") for i, row in enumerate(ds)]


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
