"""A reward model over HTTP: any stage-2 output (or registry preset) served by a stdlib
`ThreadingHTTPServer`, for PPO's `reward.remote` or any other client. API (docs/rewards.md):

    POST /score  {"prompts": [chat messages | str], "responses": [str]}  -> {"scores": [float]}
    POST /score  {"input_ids": [[int]]}   (prompt + response + EOS, as a rollout)  -> {"scores": [float]}
    GET  /health -> {"status": "ok", "model": ..., "scored": n, "batches": n}

Requests are scored in batches: one worker thread owns the model and the tokenizer (neither is
shared between threads), takes every request waiting in the queue up to `batch_size` rows, and
scores them together with `rlhf.evaluation.score_sequences`, the reward-model scorer every stage
uses, tokenised as `score_responses` does. A string prompt is one user message.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf.config import ModelInit
from rlhf.evaluation import response_rows, score_sequences
from rlhf.registry import build_scalar_model, load_tokenizer, resolve

log = logging.getLogger("rlhf.reward_server")


class BadAddress(RuntimeError):
    """The server cannot listen where it was asked to."""


class BadRequest(ValueError):
    """A request the server cannot score; answered with HTTP 400 and the message."""


@dataclass
class Job:
    """One request waiting for the worker: chat prompts and responses, or token id rows."""

    prompts: list[list[dict]] | None = None
    responses: list[str] | None = None
    rows: list[list[int]] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    error: str | None = None

    def __len__(self) -> int:
        return len(self.rows if self.rows is not None else self.responses)


class Scorer:
    """The model, the tokenizer and the worker thread that batches queued jobs."""

    def __init__(self, model_dir: str, batch_size: int, init: ModelInit | None = None):
        init = init or ModelInit()
        source = resolve(model_dir)
        self.name, self.batch_size = model_dir, batch_size
        self.tokenizer = load_tokenizer(source, init)
        self.vocab_size = len(self.tokenizer)
        self.model = build_scalar_model(source, init, self.tokenizer).eval().requires_grad_(False)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.scored = self.batches = 0
        threading.Thread(target=self._work, name="reward-scorer", daemon=True).start()

    def score(self, job: Job) -> list[float]:
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(job.error)
        return job.scores

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while sum(map(len, batch)) < self.batch_size:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                rows = [row for job in batch for row in self._rows(job)]
                scores = score_sequences(self.model, rows, self.tokenizer.pad_token_id, self.batch_size).tolist()
                self.scored, self.batches = self.scored + len(rows), self.batches + 1
                for job in batch:
                    job.scores, scores = scores[: len(job)], scores[len(job) :]
            except Exception as e:  # report it to the waiting requests (HTTP 500) and keep serving
                log.exception("scoring failed")
                for job in batch:
                    job.error = f"{type(e).__name__}: {e}"
            for job in batch:
                job.done.set()

    def _rows(self, job: Job) -> list[list[int]]:
        if job.rows is not None:
            return job.rows
        return response_rows(self.tokenizer, job.prompts, job.responses)


def parse_request(body: dict, vocab_size: int) -> Job:
    """A Job from the JSON of a POST /score; BadRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if "input_ids" in body:
        rows = body["input_ids"]
        ok = isinstance(rows, list) and all(isinstance(r, list) and r for r in rows)
        if not ok or not all(isinstance(t, int) and 0 <= t < vocab_size for r in rows for t in r):
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


def make_handler(scorer: Scorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") != "/health":
                return self._send(404, {"error": f"no GET {self.path}; try GET /health or POST /score"})
            self._send(200, {"status": "ok", "model": scorer.name, "scored": scorer.scored, "batches": scorer.batches})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                return self._send(404, {"error": f"no POST {self.path}; try POST /score"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                job = parse_request(body, scorer.vocab_size)
            except (ValueError, BadRequest) as e:  # JSONDecodeError is a ValueError
                return self._send(400, {"error": str(e)})
            try:
                self._send(200, {"scores": scorer.score(job)})
            except RuntimeError as e:
                self._send(500, {"error": str(e)})

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve(model_dir: str, host: str, port: int, batch_size: int) -> None:
    """Load the reward model, then answer requests until interrupted."""
    scorer = Scorer(model_dir, batch_size)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(scorer))
    except OSError as e:  # port taken, address not on this machine
        raise BadAddress(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    host, port = server.server_address[:2]
    # one line on stdout once the model is loaded: scripts (and the tests) wait for it
    print(f"serving {model_dir} on http://{host}:{port}/score (GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
