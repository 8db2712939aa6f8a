"""SFT formats, detected from the first record and then required of every record:

| format            | fields                                   | becomes                                  |
|-------------------|------------------------------------------|------------------------------------------|
| messages          | `messages`: [{role, content}, ...]       | prompt/completion (one final answer) or  |
|                   |                                          | messages (several assistant turns)       |
| prompt_completion | `prompt`, `completion` (strings or chat) | prompt/completion                        |
| prompt_answer     | `prompt`, `answer` (seed 000's test set) | prompt/completion                        |
| text              | `text`                                   | text (plain language modelling)          |

Every prompt is a chat: a string prompt becomes one user message and a string completion one
assistant message, so SFT, the reward model, PPO and evaluation all render text through the same
chat template. Only `text` is trained as raw text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf.data.io import DataError, Record

ROLES = ("system", "user", "assistant", "tool")
SFT_FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt_answer": ("prompt", "answer"),
    "text": ("text",),
}


def detect_sft_format(record: Record) -> str:
    keys = set(record.data)
    for name, fields in SFT_FORMATS.items():
        if set(fields) <= keys:
            return name
    expected = "; ".join(f"{n}: {', '.join(f)}" for n, f in SFT_FORMATS.items())
    raise DataError(record.where, None, f"cannot tell the SFT format from keys {sorted(keys)}; expected {expected}")


def normalize_sft(records: Sequence[Record]) -> tuple[list[dict], str]:
    """Canonical SFT examples and the detected format name."""
    if not records:
        raise DataError("<data>", None, "no records")
    fmt = detect_sft_format(records[0])
    examples = [_normalize_one(r, fmt) for r in records]
    if fmt == "messages" and any("messages" in e for e in examples):
        # Several assistant turns somewhere: train on all assistant turns of every example.
        examples = [e if "messages" in e else {"messages": e["prompt"] + e["completion"]} for e in examples]
    return examples, fmt


def _normalize_one(record: Record, fmt: str) -> dict:
    data, where = record.data, record.where
    for field in SFT_FORMATS[fmt]:
        if field not in data:
            raise DataError(where, field, f"missing (the file's first record is in the '{fmt}' format)")
    if fmt == "text":
        return {"text": nonempty_text(data["text"], where, "text")}
    if fmt == "messages":
        messages = chat(data["messages"], where, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(where, "messages", "the last message must be the assistant's answer")
        if sum(m["role"] == "assistant" for m in messages) > 1:
            return {"messages": messages}
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    answer_field = "completion" if fmt == "prompt_completion" else "answer"
    prompt = as_prompt(data["prompt"], where, "prompt")
    completion = as_response(data[answer_field], where, answer_field)
    return {"prompt": prompt, "completion": completion}


def as_prompt(value: Any, where: str, field: str) -> list[dict]:
    """A prompt as a chat: a string is one user message."""
    _string_or_chat(value, where, field)
    if isinstance(value, str):
        return [{"role": "user", "content": nonempty_text(value, where, field)}]
    messages = chat(value, where, field)
    if messages[-1]["role"] == "assistant":
        raise DataError(where, field, "a prompt must not end with an assistant message")
    return messages


def as_response(value: Any, where: str, field: str) -> list[dict]:
    """A response as one assistant message (a string, or a chat ending in the assistant's turn)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. an answer written as a number
    _string_or_chat(value, where, field)
    if isinstance(value, str):
        return [{"role": "assistant", "content": nonempty_text(value, where, field)}]
    messages = chat(value, where, field)
    if messages[-1]["role"] != "assistant":
        raise DataError(where, field, "must end with an assistant message")
    return messages[-1:]


def _string_or_chat(value: Any, where: str, field: str) -> None:
    if value is None:
        raise DataError(where, field, "missing")
    if not isinstance(value, (str, list)):
        raise DataError(where, field, f"expected a string or a list of messages, got {type(value).__name__}")


def chat(value: Any, where: str, field: str) -> list[dict]:
    """Validate a list of {role, content} messages."""
    if not isinstance(value, list) or not value:
        raise DataError(where, field, "expected a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        sub = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(where, sub, "expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise DataError(where, f"{sub}.role", f"expected one of {list(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": nonempty_text(m.get("content"), where, f"{sub}.content")})
    return out


def nonempty_text(value: Any, where: str, field: str) -> str:
    if value is None:
        raise DataError(where, field, "missing")
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(where, field, "empty")
    return value


def reference_answer(example: dict) -> str | None:
    """The reference answer of a canonical example (for generation-based evaluation)."""
    if "completion" in example:
        return example["completion"][-1]["content"]
    return None
