"""PPO prompts from any data set the other stages read: a `prompt` (string or chat) with or
without an answer, `query`, a chat `messages` list (the prompt is everything before the last
assistant turn), or HH-style `chosen` transcripts. Each becomes {"prompt": [messages],
"answer": str | None, **the record's other fields}; the answer scores held-out generations, and
the answer and the other fields (e.g. `tests`) reach PPO's reward functions (a `function` reward source)."""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.data.io import DataError, Record
from rlhf.data.preference import ASSISTANT, hh_messages
from rlhf.data.sft import as_prompt, chat


def normalize_prompts(records: Sequence[Record]) -> list[dict]:
    return [_prompt_of(r) for r in records]


def _prompt_of(record: Record) -> dict:
    prompt, answer, used = _prompt_and_answer(record)
    # the fields the prompt and answer were read from are consumed; every other one is kept as is
    extra = {k: v for k, v in record.data.items() if k not in used and k not in ("prompt", "answer")}
    return {"prompt": prompt, "answer": answer, **extra}


def _prompt_and_answer(record: Record) -> tuple[list[dict], str | None, tuple[str, ...]]:
    """(chat prompt, answer or None, the record fields they came from)."""
    data, where = record.data, record.where
    if "messages" in data:
        messages = chat(data["messages"], where, "messages")
        if messages[-1]["role"] == "assistant":
            return as_prompt(messages[:-1], where, "messages"), messages[-1]["content"], ("messages",)
        return messages, None, ("messages",)
    for field in ("prompt", "query"):
        if field in data:
            answer = data.get("answer", data.get("completion"))
            if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
                answer = answer[-1].get("content")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)  # as SFT reads it (rlhf.data.sft.as_response): "answer": 42 is "42"
            used = (field, "answer", "completion")
            return as_prompt(data[field], where, field), answer if isinstance(answer, str) else None, used
    if isinstance(data.get("chosen"), str) and ASSISTANT in data["chosen"]:
        transcript = data["chosen"]
        return hh_messages(transcript[: transcript.rfind(ASSISTANT)], where), None, ("chosen", "rejected")
    raise DataError(
        where, "prompt", f"no prompt: expected 'prompt', 'query', 'messages' or HH 'chosen'; found keys {sorted(data)}"
    )
