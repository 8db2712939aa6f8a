"""Preference formats, detected from the first record and then required of every record:

| format         | fields                                                     |
|----------------|------------------------------------------------------------|
| prompt         | `prompt`, `chosen`, `rejected` (strings or chats)          |
| query          | `query`, `chosen`, `rejected` (seed 002)                   |
| hh             | `chosen`, `rejected`: whole `\\n\\nHuman: … \\n\\nAssistant: …` |
|                | transcripts sharing an implicit prompt (Anthropic HH-RLHF) |
| chat           | `chosen`, `rejected`: message lists sharing their prefix   |
| ranked         | `prompt`, `responses`: best first, or [{text, score}, …]   |

Any format may carry a numeric `margin` (how much better chosen must score). Ranked lists become
every pair, C(n, 2) of them (seed 003: a ranking says more than thumbs up/down).

Every pair becomes {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]} plus
`margin` / `kind` when known. Pairs whose chosen equals rejected, or with an empty text, are
dropped and counted; a malformed record stops with its file, line and field.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rlhf.data.io import DataError, Record
from rlhf.data.sft import as_prompt, as_response, chat

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
PREFERENCE_FORMATS = ("ranked", "query", "prompt", "hh", "chat")


class _Skip(Exception):
    """A record to drop (not an error): the reason is counted."""


def detect_preference_format(record: Record) -> str:
    keys = set(record.data)
    if {"prompt", "responses"} <= keys:
        return "ranked"
    if {"query", "chosen", "rejected"} <= keys:
        return "query"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt"
    if {"chosen", "rejected"} <= keys:
        return "chat" if isinstance(record.data["chosen"], list) else "hh"
    raise DataError(
        record.where,
        None,
        f"cannot tell the preference format from keys {sorted(keys)}; expected prompt/chosen/rejected, "
        "query/chosen/rejected, chosen/rejected (HH transcripts or chats) or prompt/responses (ranked)",
    )


def normalize_preferences(records: Sequence[Record]) -> tuple[list[dict], str, Counter]:
    """(pairs, format, dropped): canonical pairs, the detected format and drop counts by reason."""
    if not records:
        raise DataError("<data>", None, "no records")
    fmt = detect_preference_format(records[0])
    pairs: list[dict] = []
    dropped: Counter = Counter()
    for record in records:
        try:
            pairs += _pairs_of(record, fmt)
        except _Skip as skip:
            dropped[str(skip)] += 1
    return pairs, fmt, dropped


def _pairs_of(record: Record, fmt: str) -> list[dict]:
    data, where = record.data, record.where
    margin = _margin(data, where)
    extra = {"margin": margin} if margin is not None else {}
    if "kind" in data and isinstance(data["kind"], str):
        extra["kind"] = data["kind"]
    if fmt == "ranked":
        return _ranked_pairs(data, where)
    if fmt in ("prompt", "query"):
        prompt = as_prompt(_required(data, fmt, where), where, fmt)
        chosen = _response(data, "chosen", where, prompt)
        rejected = _response(data, "rejected", where, prompt)
    elif fmt == "hh":
        prompt, chosen, rejected = _split_hh(data, where)
    else:
        prompt, chosen, rejected = _split_chats(data, where)
    return [_pair(prompt, chosen, rejected, extra)]


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], extra: dict) -> dict:
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise _Skip("chosen equals rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _required(data: dict, field: str, where: str) -> Any:
    if field not in data:
        raise DataError(where, field, "missing")
    return data[field]


def _response(data: dict, field: str, where: str, prompt: list[dict]) -> list[dict]:
    value = _required(data, field, where)
    if isinstance(value, str) and not value.strip():
        raise _Skip("empty text")
    if isinstance(value, list) and len(value) > 1 and value[: len(prompt)] == prompt:
        value = value[len(prompt) :]  # a chat that repeats the prompt before the answer
    return as_response(value, where, field)


def _margin(data: dict, where: str) -> float | None:
    if data.get("margin") is None:
        return None
    if isinstance(data["margin"], bool) or not isinstance(data["margin"], (int, float)):
        raise DataError(where, "margin", f"expected a number, got {data['margin']!r}")
    if not math.isfinite(data["margin"]):  # Python's json reads NaN and Infinity; they make the loss NaN
        raise DataError(where, "margin", f"must be a finite number, got {data['margin']}")
    return float(data["margin"])


def _split_hh(data: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    texts = {}
    for field in ("chosen", "rejected"):
        value = data[field]
        if not isinstance(value, str):
            raise DataError(where, field, f"expected a transcript string, got {type(value).__name__}")
        if ASSISTANT not in value:
            raise DataError(where, field, f"an HH transcript needs a '{ASSISTANT.strip()}' turn")
        texts[field] = value
    cut = texts["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
    shared = texts["chosen"][:cut]
    if not texts["rejected"].startswith(shared):
        raise DataError(where, "rejected", "does not share the chosen transcript's prompt")
    prompt = hh_messages(shared[: -len(ASSISTANT)], where)
    chosen, rejected = texts["chosen"][cut:].strip(), texts["rejected"][cut:].strip()
    if not chosen or not rejected:
        raise _Skip("empty text")
    return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


def hh_messages(text: str, where: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user/assistant/user messages."""
    messages, pos = [], 0
    while pos < len(text):
        h, a = text.find(HUMAN, pos), text.find(ASSISTANT, pos)
        starts = [(i, m) for i, m in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        start, marker = min(starts)
        nxt = [i for i in (text.find(HUMAN, start + len(marker)), text.find(ASSISTANT, start + len(marker))) if i >= 0]
        end = min(nxt) if nxt else len(text)
        content = text[start + len(marker) : end].strip()
        role = "user" if marker == HUMAN else "assistant"
        if content:
            messages.append({"role": role, "content": content})
        pos = end
    if not messages or messages[-1]["role"] != "user":
        raise DataError(where, "chosen", "an HH transcript must end its prompt with a Human turn")
    return messages


def _split_chats(data: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    chosen, rejected = chat(data["chosen"], where, "chosen"), chat(data["rejected"], where, "rejected")
    if "prompt" in data:
        prompt = as_prompt(data["prompt"], where, "prompt")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
        if not prompt:
            raise DataError(where, "chosen", "chosen and rejected chats share no prompt messages")
        chosen, rejected = chosen[n:], rejected[n:]
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(where, field, "must end with exactly one assistant message after the shared prompt")
    return prompt, chosen, rejected


def _ranked_pairs(data: dict, where: str) -> list[dict]:
    prompt = as_prompt(data["prompt"], where, "prompt")
    responses = data["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(where, "responses", "expected a list of at least two responses")
    ranked: list[tuple[str, float | None]] = []
    for i, r in enumerate(responses):
        field = f"responses[{i}]"
        if isinstance(r, str):
            ranked.append((r, None))
        elif isinstance(r, dict):
            text = r.get("text", r.get("response", r.get("content")))
            if not isinstance(text, str):
                raise DataError(where, f"{field}.text", "missing (expected 'text', 'response' or 'content')")
            score = r.get("score")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise DataError(where, f"{field}.score", f"expected a number, got {score!r}")
            if score is not None and not math.isfinite(score):  # NaN sorts anywhere: the ranking is lost
                raise DataError(where, f"{field}.score", f"must be a finite number, got {score}")
            ranked.append((text, score))
        else:
            raise DataError(where, field, "expected a string or an object with text and score")
    scored = [s is not None for _, s in ranked]
    if any(scored) and not all(scored):
        raise DataError(where, "responses", "either every response has a score or none has")
    if all(scored):
        ranked.sort(key=lambda t: -t[1])  # best first
    pairs = []
    for i in range(len(ranked)):
        for j in range(i + 1, len(ranked)):
            (ti, si), (tj, sj) = ranked[i], ranked[j]
            if si is not None and si == sj:
                continue  # a tie says nothing about order
            if not ti.strip() or not tj.strip() or ti.strip() == tj.strip():
                continue
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": ti}],
                    "rejected": [{"role": "assistant", "content": tj}],
                }
            )
    if not pairs:
        raise _Skip("no ordered pair in ranking")
    return pairs
