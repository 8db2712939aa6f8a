"""PPO's client of a reward model served over HTTP (`launch/serve_rm.py`, `reward.remote`).

One POST per step and process: {"prompts": [chat messages], "responses": [str]} -> {"scores":
[float]}. Connection errors, time-outs and HTTP 5xx are retried with exponential backoff (as
OpenRLHF's remote reward client does); after the last try the run stops with `RemoteRewardError`
(exit code 3, rlhf/cli.py), before the step touches the weights, so the last checkpoint resumes.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from rlhf.config.stages import RemoteRewardConfig

log = logging.getLogger("rlhf.reward_client")


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or answered nonsense; the message names the URL."""


def remote_scores(cfg: RemoteRewardConfig, prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
    """The served reward model's score of each response to its chat prompt."""
    body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode()
    tries = cfg.retries + 1
    for attempt in range(tries):
        try:
            return _checked(cfg.url, _post(cfg.url, body, cfg.timeout), len(responses))
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            if e.code < 500:  # our request is wrong: asking again gives the same answer
                raise RemoteRewardError(f"reward server {cfg.url} refused the request: HTTP {e.code} {detail}") from e
            error = f"HTTP {e.code} {detail}"
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            error = str(getattr(e, "reason", e))
        if attempt + 1 < tries:
            wait = cfg.backoff * 2**attempt
            log.warning("reward server %s: %s; try %d of %d in %.1f s", cfg.url, error, attempt + 2, tries, wait)
            time.sleep(wait)
    raise RemoteRewardError(
        f"reward server {cfg.url} did not answer after {tries} tries ({error}); the run stopped before this step "
        "changed the weights: restart the server and run the same command to resume from the last checkpoint"
    )


def _post(url: str, body: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _checked(url: str, raw: bytes, n: int) -> list[float]:
    """The answer's scores, if it holds n finite numbers; RemoteRewardError otherwise."""
    try:
        scores = json.loads(raw)["scores"]
    except (ValueError, KeyError, TypeError):
        raise RemoteRewardError(f"reward server {url} answered without a 'scores' list: {raw[:200]!r}") from None
    if not isinstance(scores, list) or len(scores) != n:
        raise RemoteRewardError(f"reward server {url} answered {scores!r:.200} for {n} responses")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RemoteRewardError(f"reward server {url} answered a score {s!r} that is not a finite number")
    return [float(s) for s in scores]
