"""PPO prompts from any data set the other stages read: a `prompt` (string or chat) with or
without an answer, `query`, a chat `messages` list (the prompt is everything before the last
assistant turn), or HH-style `chosen` transcripts. Each becomes {"prompt": [messages],
"answer": str | None}; the answer, when present, is only used to score held-out generations."""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.data.io import DataError, Record
from rlhf.data.preference import ASSISTANT, hh_messages
from rlhf.data.sft import as_prompt, chat


def normalize_prompts(records: Sequence[Record]) -> list[dict]:
    return [_prompt_of(r) for r in records]


def _prompt_of(record: Record) -> dict:
    data, where = record.data, record.where
    if "messages" in data:
        messages = chat(data["messages"], where, "messages")
        if messages[-1]["role"] == "assistant":
            return {"prompt": as_prompt(messages[:-1], where, "messages"), "answer": messages[-1]["content"]}
        return {"prompt": messages, "answer": None}
    for field in ("prompt", "query"):
        if field in data:
            answer = data.get("answer", data.get("completion"))
            if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
                answer = answer[-1].get("content")
            return {
                "prompt": as_prompt(data[field], where, field),
                "answer": answer if isinstance(answer, str) else None,
            }
    if isinstance(data.get("chosen"), str) and ASSISTANT in data["chosen"]:
        transcript = data["chosen"]
        return {"prompt": hh_messages(transcript[: transcript.rfind(ASSISTANT)], where), "answer": None}
    raise DataError(
        where, "prompt", f"no prompt: expected 'prompt', 'query', 'messages' or HH 'chosen'; found keys {sorted(data)}"
    )
