"""Real chat prompts for the benchmarks' real-model rows, and the host facts their JSON quotes.

Open questions rather than the subtraction task: a chat model answers `47 - 19` in a few tokens and
stops, while a rollout benchmark at 256 new tokens (and a PPO one at 16) wants responses that run to
the limit, so that every engine and trainer generates the same number of tokens. 8 requests x 8
topics, all distinct (no prefix-cache shortcut beyond the shared system prompt), in a fixed order.
"""

from __future__ import annotations

import itertools
import subprocess

REQUESTS = [
    "Explain how {} works, step by step.",
    "Write a short essay about {}.",
    "What are the main advantages and disadvantages of {}?",
    "Describe the history of {} in a few paragraphs.",
    "Give me five practical tips about {}, with a sentence on each.",
    "How would you teach {} to a ten-year-old?",
    "What are common misconceptions about {}?",
    "Compare {} with something similar and explain the differences.",
]
TOPICS = [
    "photosynthesis",
    "a bicycle",
    "the internet",
    "vaccination",
    "compound interest",
    "the water cycle",
    "public libraries",
    "electric cars",
]


def open_questions(n: int) -> list[str]:
    """`n` distinct open questions (past 64 the questions repeat with a numbered suffix)."""
    base = [r.format(t) for t, r in itertools.product(TOPICS, REQUESTS)]
    return [base[i % len(base)] + (f" ({i // len(base) + 1})" if i >= len(base) else "") for i in range(n)]


def cpu_model() -> str:
    """lscpu's model name: timings are only comparable on the same CPU."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"
