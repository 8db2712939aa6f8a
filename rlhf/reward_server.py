"""A reward model over HTTP: any stage-2 output (or registry preset) served by uvicorn, for
PPO's `remote` reward source or any other client. API (docs/rewards.md):

    POST /score  {"prompts": [chat messages | str], "responses": [str]}  -> {"scores": [float], "fingerprint": str}
    POST /score  {"input_ids": [[int]]}   (prompt + response + EOS, as a rollout)  -> the same
    GET  /health -> {"status": "ok", "model": ..., "fingerprint": ..., "scored": n, "batches": n, ...}

Requests are scored in batches: one worker thread owns the model and the tokenizer (neither is
shared between threads), takes every request waiting in the queue up to `batch_size` rows, and
scores them together with `rlhf.evaluation.score_sequences`, the reward-model scorer every stage
uses, tokenised as `score_responses` does. A string prompt is one user message.

One request cannot harm another: its body and JSON nesting are capped before it is parsed, it is
tokenised and truncated on its own (a chat template that refuses its messages is its own HTTP 400),
a batch that fails is scored again request by request, and a request whose client left or that
waited past `request_timeout` is dropped from the queue unscored. Connections that send no whole
request within `idle_timeout` are closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import re
import socket
import threading
from dataclasses import dataclass

import numpy as np
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlhf.config import ModelInit
from rlhf.evaluation import response_rows, score_sequences
from rlhf.precision import resolve_precision
from rlhf.registry import build_scalar_model, load_tokenizer, resolve

log = logging.getLogger("rlhf.reward_server")

FINGERPRINT_HEADER = "x-reward-fingerprint"  # the client's expected fingerprint; another one is refused (409)


class BadAddress(RuntimeError):
    """The server cannot listen where it was asked to."""


class BadRequest(ValueError):
    """A request the server will not score; answered with `status` (400 unless said) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request or connection may cost the server."""

    max_body: int = 16 << 20  # bytes of a POST body; a larger one is answered 413 unread
    max_depth: int = 8  # JSON nesting (the API needs 4: {"prompts": [[{...}]]}); deeper is a 400, parsed never
    idle_timeout: float = 30.0  # s a connection may hold without a whole request (silent or slow clients)
    request_timeout: float = 600.0  # s a request may wait for its scores; then its job is cancelled (503)
    max_connections: int = 256  # connections open at once; beyond, uvicorn answers 503


@dataclass
class Job:
    """One request waiting for the worker: chat prompts and responses, or token id rows."""

    prompts: list[list[dict]] | None = None
    responses: list[str] | None = None
    rows: list[list[int]] | None = None
    cancelled: bool = False  # its client left or it waited too long: the worker drops it
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None  # (status, payload), set from the worker thread

    def __len__(self) -> int:
        return len(self.rows if self.rows is not None else self.responses)

    def finish(self, status: int, payload: dict) -> None:
        """Hand the answer to the request's event loop (called from the worker thread)."""
        self.loop.call_soon_threadsafe(_settle, self.future, (status, payload))


def _settle(future: asyncio.Future, answer: tuple[int, dict]) -> None:
    if not future.done():
        future.set_result(answer)


class Scorer:
    """The model (on the GPU when there is one), its tokenizer and the worker thread that
    batches queued jobs."""

    def __init__(self, model_dir: str, batch_size: int, max_len: int | None = None, init: ModelInit | None = None):
        init = init or ModelInit()
        precision = resolve_precision(init)  # bf16 on a GPU that has it; the device decided here, once
        source = resolve(model_dir)
        self.name, self.batch_size = model_dir, batch_size
        self.tokenizer = load_tokenizer(source, init)
        self.vocab_size = len(self.tokenizer)
        model = build_scalar_model(source, init, self.tokenizer, precision=precision).eval().requires_grad_(False)
        self.fingerprint = model_fingerprint(model, self.tokenizer)  # on the CPU copy, before it moves
        self.device = torch.device("cuda" if precision.cuda else "cpu")
        self.model = model.to(self.device)
        # OpenRLHF's server truncates to --max_len; past its positions an absolute-position model fails
        self.max_len = max_len or positions(model.config)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.scored = self.batches = self.truncated = self.cancelled = 0
        threading.Thread(target=self._work, name="reward-scorer", daemon=True).start()

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.name,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "max_len": self.max_len,
            "scored": self.scored,
            "batches": self.batches,
            "truncated": self.truncated,
            "cancelled": self.cancelled,
            "queued": self.jobs.qsize(),  # requests waiting behind the one being scored
        }

    async def submit(self, job: Job, receive, timeout: float) -> tuple[int, dict]:
        """Queue the job and wait for its answer; a client that leaves, or a wait past `timeout`,
        cancels it (the worker skips it) instead of leaving it to be scored for nobody."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self.jobs.put(job)
        gone = asyncio.ensure_future(_disconnected(receive))
        done, _ = await asyncio.wait({job.future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if job.future in done:
            return job.future.result()
        job.cancelled = True
        self.cancelled += 1
        return 503, {"error": f"not scored within {timeout:g} s (the server is busy); the request was cancelled"}

    def _work(self) -> None:
        while True:
            ready = []
            for job in self._take():
                if job.cancelled:
                    continue
                try:  # tokenised and truncated request by request: one bad request fails alone
                    job.rows = self._truncated(job.rows if job.rows is not None else self._rows(job))
                    ready.append(job)
                except Exception as e:  # e.g. a role the chat template refuses
                    job.finish(400, {"error": f"cannot tokenise the request: {type(e).__name__}: {e}"})
            if ready:
                self._score(ready)

    def _take(self) -> list[Job]:
        """The next job, and every job queued behind it up to `batch_size` rows."""
        batch = [self.jobs.get()]
        while sum(map(len, batch)) < self.batch_size:
            try:
                batch.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return batch

    def _score(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        try:
            scores = score_sequences(self.model, rows, self.tokenizer.pad_token_id, self.batch_size).tolist()
        except Exception as e:
            if len(jobs) > 1:  # find the request at fault: the others must not fail with it
                for job in jobs:
                    self._score([job])
                return
            log.exception("scoring failed")
            jobs[0].finish(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})
            return
        self.scored, self.batches = self.scored + len(rows), self.batches + 1
        for job in jobs:
            job.finish(200, {"scores": scores[: len(job)], "fingerprint": self.fingerprint})
            scores = scores[len(job) :]

    def _rows(self, job: Job) -> list[list[int]]:
        return response_rows(self.tokenizer, job.prompts, job.responses)

    def _truncated(self, rows: list[list[int]]) -> list[list[int]]:
        """Rows cut to `max_len` tokens, keeping the start, as the RM stage truncates its pairs
        (rlhf/data/lengths.py) and OpenRLHF's server its inputs."""
        if self.max_len is None:
            return rows
        self.truncated += sum(len(r) > self.max_len for r in rows)
        return [r[: self.max_len] for r in rows]


def positions(config) -> int | None:
    """How many positions the model has (None: the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def model_fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """sha256 of the weights as served (names, dtypes, shapes, bytes), the vocabulary and the chat
    template: which model a server scores with. The client records it and refuses another one
    (rlhf/reward_client.py). The same files served in another dtype are another fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template], ensure_ascii=True)
    digest.update(text.encode())
    return digest.hexdigest()[:16]


def parse_request(body: dict, vocab_size: int) -> Job:
    """A Job from the JSON of a POST /score; BadRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if "input_ids" in body:
        rows = body["input_ids"]
        ok = isinstance(rows, list) and all(isinstance(r, list) and r for r in rows)
        if not ok or not all(type(t) is int and 0 <= t < vocab_size for r in rows for t in r):
            raise BadRequest(f"'input_ids' must be a list of non-empty lists of token ids in [0, {vocab_size})")
        return Job(rows=rows)
    prompts, responses = body.get("prompts"), body.get("responses")
    if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
        raise BadRequest("expected 'prompts' and 'responses', two lists of the same length (or 'input_ids')")
    if not all(isinstance(r, str) for r in responses):
        raise BadRequest("'responses' must be strings")
    return Job(prompts=[_chat(p, i) for i, p in enumerate(prompts)], responses=responses)


def _chat(prompt, i: int) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        return prompt
    raise BadRequest(f"prompts[{i}] must be a string or a list of {{'role', 'content'}} messages")


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(raw: bytes) -> int:
    """How deeply a JSON text nests, counted without parsing it: the parser recurses once per
    level and a deep enough text raises RecursionError inside it."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)  # brackets inside strings do not nest
    steps = np.isin(bare, _OPEN).astype(np.int8) - np.isin(bare, _CLOSE).astype(np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_body(raw: bytes, max_depth: int):
    if json_depth(raw) > max_depth:
        raise BadRequest(f"the JSON nests deeper than {max_depth} levels")
    try:
        return json.loads(raw or b"null")
    except ValueError as e:  # JSONDecodeError, and bytes that are not UTF-8
        raise BadRequest(f"the body is not JSON: {e}") from None


async def read_body(scope: dict, receive, limits: Limits) -> bytes:
    """The request body, refused (413) past `max_body` before it is read, or as soon as it grows
    past it (chunked); a body that stalls for `idle_timeout` is refused with 408."""
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and int(length) > limits.max_body:
        raise BadRequest(f"the body has {int(length)} bytes; this server takes at most {limits.max_body}", 413)
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), limits.idle_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the body did not arrive within {limits.idle_timeout:g} s", 408) from None
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left", 400)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limits.max_body:
            raise BadRequest(f"the body is longer than {limits.max_body} bytes", 413)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive) -> None:
    """Returns once the client has closed its connection (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send, status: int, payload: dict, close: bool = False) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # an unread body is left on the connection: it cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def make_app(scorer: Scorer, limits: Limits):
    """The ASGI application: GET /health and POST /score."""

    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan is off; nothing else is served
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if method == "GET" and path == "/health":
            return await _send(send, 200, scorer.health())
        if method != "POST" or path != "/score":
            return await _send(send, 404, {"error": f"no {method} {scope['path']}; try POST /score or GET /health"})
        expected = dict(scope["headers"]).get(FINGERPRINT_HEADER.encode(), b"").decode(errors="replace")
        try:
            if expected and expected != scorer.fingerprint:
                raise BadRequest(
                    f"this server scores with {scorer.name} (fingerprint {scorer.fingerprint}), "
                    f"not the model the client expects ({expected})",
                    409,
                )
            body = parse_body(await read_body(scope, receive, limits), limits.max_depth)
            job = parse_request(body, scorer.vocab_size)
        except BadRequest as e:
            return await _send(send, e.status, {"error": str(e), "fingerprint": scorer.fingerprint}, close=True)
        status, payload = await scorer.submit(job, receive, limits.request_timeout)
        await _send(send, status, payload)

    return app


class IdleClosingH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that holds no whole request for
    `timeout_keep_alive` seconds. uvicorn arms that timer only after a response and any byte
    disarms it, so a client that connects and says nothing, or sends its headers a byte at a
    time, would hold its connection forever."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(self.timeout_keep_alive, self._close_if_idle, self.cycle)

    def _close_if_idle(self, cycle) -> None:
        # still the cycle of the arming (none, or the one just answered): no request arrived since
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); BadAddress if the address cannot be had."""
    try:
        return socket.create_server((host, port))
    except OSError as e:  # port taken, address not on this machine
        raise BadAddress(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def http_server(scorer: Scorer, limits: Limits) -> uvicorn.Server:
    """uvicorn serving `make_app`; `.run(sockets=[listen(...)])` serves until interrupted."""
    config = uvicorn.Config(
        make_app(scorer, limits),
        http=IdleClosingH11,
        timeout_keep_alive=limits.idle_timeout,
        limit_concurrency=limits.max_connections,
        lifespan="off",
        access_log=False,
        log_config=None,  # keep rlhf's logging as set up
        log_level="warning",
    )
    return uvicorn.Server(config)


def serve(model_dir: str, host: str, port: int, batch_size: int, max_len: int | None = None, limits=Limits()) -> None:
    """Load the reward model, then answer requests until interrupted."""
    scorer = Scorer(model_dir, batch_size, max_len)
    sock = listen(host, port)
    host, port = sock.getsockname()[:2]
    # one line on stdout once the model is loaded and the port bound: scripts (and the tests) wait for it
    print(f"serving {model_dir} on http://{host}:{port}/score (GET /health; {scorer.device})", flush=True)
    http_server(scorer, limits).run(sockets=[sock])
