"""PPO's client of a reward model served over HTTP (`launch/serve_rm.py`, a `remote` reward source).

One POST per step and process: {"prompts": [chat messages], "responses": [str]} -> {"scores":
[float], "fingerprint": str}, over one pooled connection (httpx). Connection errors, time-outs and
HTTP 5xx are retried with exponential backoff (as OpenRLHF's remote reward client does); after the
last try the run stops with `RemoteRewardError` (exit code 3, rlhf/cli.py), before the step touches
the weights, so the last checkpoint resumes.

Which model the server scores with is part of a run: `connect` reads the served model's
fingerprint (GET /health), the run records it with its checkpoints, every request carries it, and a
server that scores with another model (restarted with another reward model) is refused with
`ServedModelChanged` (exit code 2), on resume or mid-run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

from rlhf.config.rewards import RemoteSourceConfig

log = logging.getLogger("rlhf.reward_client")

FINGERPRINT_HEADER = "X-Reward-Fingerprint"  # rlhf/reward_server.py refuses another fingerprint (409)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or answered nonsense; the message names the URL."""


class ServedModelChanged(RuntimeError):
    """The reward server scores with another model than the one this run was scored with."""


class RewardClient:
    """One process's client: a pooled connection (no new connection per request) that never goes
    through a proxy to this machine, and the fingerprint of the served model."""

    def __init__(self, cfg: RemoteSourceConfig):
        self.cfg = cfg
        self.fingerprint: str | None = None
        # http_proxy would route even 127.0.0.1 through the proxy (urllib did), which cannot reach it
        self.http = httpx.Client(
            trust_env=urlsplit(cfg.url).hostname not in LOOPBACK,
            timeout=cfg.timeout,
            # dropped before the server's idle timeout (30 s) so that a reused one is never half-closed
            limits=httpx.Limits(max_connections=4, keepalive_expiry=20.0),
        )

    def connect(self) -> str | None:
        """The served model's fingerprint, from GET /health (retried as a request is); None from a
        server that does not give one (not launch/serve_rm.py): then nothing can be checked."""
        health_url = self.cfg.url.rstrip("/").rsplit("/", 1)[0] + "/health"
        try:
            health = self._request("GET", health_url)
        except RemoteRewardError as e:
            if "HTTP 404" not in str(e):
                raise
            health = {}
        self.fingerprint = health.get("fingerprint") if isinstance(health, dict) else None
        if self.fingerprint is None:
            log.warning("reward server %s gives no model fingerprint: the model it serves is unchecked", self.cfg.url)
        return self.fingerprint

    def check(self, recorded: str | None) -> str | None:
        """The fingerprint to record with this run's checkpoints; ServedModelChanged if they were
        scored with another model than the one served now."""
        if recorded and self.fingerprint and recorded != self.fingerprint:
            raise self._changed(self.fingerprint, recorded)
        self.fingerprint = self.fingerprint or recorded
        return self.fingerprint

    def scores(self, prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        """The served reward model's score of each response to its chat prompt."""
        body = {"prompts": list(prompts), "responses": list(responses)}
        answer = self._request("POST", self.cfg.url, body)
        served = answer.get("fingerprint") if isinstance(answer, dict) else None
        if self.fingerprint and served and served != self.fingerprint:  # a server that ignores the header
            raise self._changed(served, self.fingerprint)
        return checked_scores(self.cfg.url, answer, len(responses))

    def close(self) -> None:
        self.http.close()

    def _changed(self, served: str, recorded: str) -> ServedModelChanged:
        return ServedModelChanged(
            f"reward server {self.cfg.url} scores with another model (fingerprint {served}) than this run "
            f"was scored with ({recorded}): serve that model again, or start over with train.resume=false"
        )

    def _request(self, method: str, url: str, body: dict | None = None):
        """The JSON answer, after up to `retries` more tries of a transient failure."""
        headers = {FINGERPRINT_HEADER: self.fingerprint} if self.fingerprint else {}
        tries = self.cfg.retries + 1
        for attempt in range(tries):
            try:
                response = self.http.request(method, url, json=body, headers=headers)
            except httpx.TransportError as e:  # refused, reset, timed out, cut short
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if response.status_code == 409 and self.fingerprint:
                    raise self._changed(_json(response).get("fingerprint", "?"), self.fingerprint)
                if response.status_code < 400:
                    return _json(response, url)
                detail = response.text[:300]
                if response.status_code < 500:  # our request is wrong: asking again gives the same answer
                    raise RemoteRewardError(
                        f"reward server {url} refused the request: HTTP {response.status_code} {detail}"
                    )
                error = f"HTTP {response.status_code} {detail}"
            if attempt + 1 < tries:
                wait = self.cfg.backoff * 2**attempt
                log.warning("reward server %s: %s; try %d of %d in %.1f s", url, error, attempt + 2, tries, wait)
                time.sleep(wait)
        raise RemoteRewardError(
            f"reward server {url} did not answer after {tries} tries ({error}); the run stopped before this step "
            "changed the weights: restart the server and run the same command to resume from the last checkpoint"
        )


def _json(response: httpx.Response, url: str | None = None):
    try:
        return response.json()
    except ValueError:
        if url is None:
            return {}
        raise RemoteRewardError(
            f"reward server {url} answered something that is not JSON: {response.text[:200]!r}"
        ) from None


def checked_scores(url: str, answer, n: int) -> list[float]:
    """The answer's scores, if it holds n finite numbers; RemoteRewardError otherwise."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        raise RemoteRewardError(f"reward server {url} answered {answer!r:.200} for {n} responses")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise RemoteRewardError(f"reward server {url} answered a score {s!r} that is not a finite number")
    return [float(s) for s in scores]
