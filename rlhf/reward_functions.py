"""Your own reward functions for PPO: a reward source `{kind: function, function: "package.module:function"}`.

A reward function is any importable callable

    def my_reward(prompts, responses, **fields) -> list[float]

called by keyword once per PPO step on each process's episodes:

- `prompts`: the chat prompt of each episode, a list of {"role", "content"} messages (the whole
  conversation, not only the last user message: a function can read the system prompt or earlier
  turns, and the last user message is `prompts[i][-1]["content"]`; TRL's GRPO reward functions
  receive conversational prompts the same way);
- `responses`: the decoded responses (special tokens skipped);
- `fields`: every other field of the prompt rows, one list per field aligned with the prompts:
  `answer` (always; None where the row has none) and whatever else the training prompts carry
  (e.g. `tests`); a row without a field gives None there. Accept `**fields` to ignore the rest.
  A data field called `prompts` or `responses` is not passed (those names are taken).

It returns one finite float per response. The task rules are reward functions of the same form
(`rlhf.tasks.rule_reward`), checked by the same call. The config checks only the spec's form;
the function is imported when the stage starts (stages/ppo/rewards.py), and errors name it.
This module is a leaf (no `rlhf` imports). See docs/rewards.md.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger("rlhf.reward_functions")


class RewardFunctionError(ValueError):
    """A reward function that cannot be imported or returned something other than one finite
    float per response; the message names the function."""


def load_reward_function(spec: str) -> Callable:
    """The callable named by "package.module:function" (a dotted attribute path after the colon
    works too, e.g. "pkg.mod:Class.method"). RewardFunctionError if it cannot be had."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"reward function {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a user's module can fail to import in any way: report it, naming it
        raise RewardFunctionError(f"reward function {spec!r}: cannot import {module_name!r}: {e!r}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardFunctionError(f"reward function {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(f"reward function {spec!r}: {attr!r} is not callable")
    return obj


def call_reward_function(
    spec: str, prompts: Sequence[list[dict]], responses: Sequence[str], fields: dict[str, list]
) -> list[float]:
    """`spec`'s scores of the responses, checked: one finite float per response."""
    fn = load_reward_function(spec)  # the module is imported once; later calls are a dict look-up
    return checked_scores(fn, spec, prompts, responses, fields)


def checked_scores(
    fn: Callable, spec: str, prompts: Sequence[list[dict]], responses: Sequence[str], fields: dict[str, list]
) -> list[float]:
    """fn(prompts=…, responses=…, **fields), checked: one finite float per response; errors name `spec`."""
    try:
        out = fn(prompts=list(prompts), responses=list(responses), **fields)
    except Exception as e:  # the user's code: keep its traceback in the log, name it in the one-line error
        log.exception("reward function %s raised", spec)
        raise RewardFunctionError(f"reward function {spec!r} raised {type(e).__name__}: {e}") from e
    try:
        values = list(out)
    except TypeError:
        raise RewardFunctionError(f"reward function {spec!r} returned {type(out).__name__}, not a list") from None
    if len(values) != len(responses):
        raise RewardFunctionError(
            f"reward function {spec!r} returned {len(values)} scores for {len(responses)} responses"
        )
    scores = []
    for i, v in enumerate(values):
        # bool is an int in Python, but a True/False reward is almost always a missing float()
        if isinstance(v, bool) or (not isinstance(v, (int, float)) and not _is_scalar(v)):
            raise RewardFunctionError(f"reward function {spec!r} returned {v!r} at index {i}, not a float")
        if not math.isfinite(float(v)):
            raise RewardFunctionError(f"reward function {spec!r} returned {float(v)} at index {i}, not finite")
        scores.append(float(v))
    return scores


def row_fields(rows: Sequence[dict]) -> dict[str, list]:
    """The prompt rows' fields other than the prompt, as one list per field (None where a row
    lacks one): the keyword arguments a reward function receives besides prompts and responses."""
    names = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "prompts", "responses"))
    return {name: [row.get(name) for row in rows] for name in names}


def _is_scalar(v) -> bool:
    """A 0-d number such as numpy.float32 or a one-element tensor (anything with a float `item()`)."""
    item = getattr(v, "item", None)
    try:
        return callable(item) and isinstance(item(), (int, float)) and not isinstance(item(), bool)
    except (TypeError, ValueError, RuntimeError):
        return False
