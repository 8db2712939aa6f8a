"""Unpaired preference data, as KTO learns from it (Ethayarajh et al. 2024): one answer per record
with a thumbs up or down, the way users often have feedback (a like button, not a comparison).

    {"prompt": "How do I boil an egg?", "completion": "Put it in boiling water for 8 minutes.", "label": true}
    {"prompt": [{"role": "user", "content": "..."}],
     "completion": [{"role": "assistant", "content": "..."}], "label": false}

`prompt` is a string or a chat; `completion` a string or a chat ending with the assistant's turn;
`label` true (desirable) or false (undesirable), nothing else. Pairs in any preference format
become two records each: the chosen answer liked, the rejected one not (`unpair`), which is also
what `python -m rlhf.data.unpaired pairs.jsonl kto.jsonl` writes. A malformed record stops with
its file, line and field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from rlhf.data.io import DataError, Record, read_records
from rlhf.data.preference import normalize_preferences
from rlhf.data.sft import as_prompt, as_response


def is_unpaired(record: Record) -> bool:
    """A record of the unpaired format: a `completion` and a `label` (pairs carry chosen/rejected)."""
    return {"completion", "label"} <= set(record.data)


def normalize_unpaired(records: Sequence[Record]) -> tuple[list[dict], Counter]:
    """(examples, dropped): {"prompt": [messages], "completion": [assistant], "label": bool} each;
    empty answers are dropped and counted, anything else malformed stops with file, line, field."""
    examples: list[dict] = []
    dropped: Counter = Counter()
    for record in records:
        data, where = record.data, record.where
        if not is_unpaired(record):
            missing = sorted({"prompt", "completion", "label"} - set(data))
            raise DataError(where, missing[0], "missing (an unpaired record needs prompt, completion, label)")
        label = data["label"]
        if not isinstance(label, bool):
            raise DataError(where, "label", f"expected true (thumbs up) or false (thumbs down), got {label!r}")
        if "prompt" not in data:
            raise DataError(where, "prompt", "missing")
        if isinstance(data["completion"], str) and not data["completion"].strip():
            dropped["empty text"] += 1
            continue
        prompt = as_prompt(data["prompt"], where, "prompt")
        completion = as_response(data["completion"], where, "completion")
        examples.append({"prompt": prompt, "completion": completion, "label": label})
    return examples, dropped


def unpair(pairs: Sequence[dict]) -> list[dict]:
    """Normalised pairs -> unpaired examples: each pair's chosen answer liked, then its rejected one
    not (adjacent, so a batch holds both kinds and KTO's weights stay balanced)."""
    out = []
    for pair in pairs:
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out


def as_unpaired(records: Sequence[Record]) -> tuple[list[dict], str, Counter]:
    """(examples, format, dropped) of records in the unpaired format or any preference format
    (told from the first record; every record must then be of it)."""
    if not records:
        raise DataError("<data>", None, "no records")
    if is_unpaired(records[0]):
        examples, dropped = normalize_unpaired(records)
        return examples, "unpaired", dropped
    pairs, fmt, dropped = normalize_preferences(records)
    return unpair(pairs), f"{fmt} pairs, unpaired", dropped


def write_unpaired(pairs_source: str, out_path: str, split: str = "train") -> int:
    """Write the unpaired records of a pair file (any preference format) as JSON lines; returns how many."""
    pairs, _fmt, _dropped = normalize_preferences(read_records(pairs_source, split))
    examples = unpair(pairs)
    with open(out_path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return len(examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pairs (any preference format) -> KTO's unpaired JSON lines.")
    parser.add_argument("pairs", help="a pair file, saved dataset or hub id")
    parser.add_argument("out", help="the .jsonl to write")
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    try:
        n = write_unpaired(args.pairs, args.out, args.split)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
