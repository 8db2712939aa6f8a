"""Read the scalar history of an offline wandb run (the run-*.wandb file) without the network.

wandb writes its records in the LevelDB log format (32 KiB blocks; each chunk has a 7-byte
header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ':W&B' file header; each
record is a protobuf `wandb.proto.wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield _parse(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield _parse(pending + chunk)
            pending = b""


def _parse(blob: bytes):
    record = pb.Record()
    record.ParseFromString(blob)
    return record


def history(path: str | Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of every numeric value logged with a step."""
    out: dict[str, dict[int, float]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            "/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in record.history.item
        }
        step = record.history.step.num if record.history.HasField("step") else items.get("_step")
        for key, value in items.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                out.setdefault(key, {})[int(step)] = float(value)
    return out
