"""A reward model over HTTP, in a real server process on 127.0.0.1 (`launch/serve_rm.py`): its
scores equal the local scorer's, requests are scored in batches, and PPO with a `remote` reward source
trains from it, stops with exit code 3 naming the URL when the server dies mid-run, and resumes
from its last checkpoint once the server is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from test_ppo_stage import FAST  # the stage tests' fast settings

from conftest import ROOT, run_entry, tiny_config
from rlhf.checkpoint import checkpoint_digest
from rlhf.config import NOT_HASHED, ModelInit, PPOStageConfig, config_hash, load_config
from rlhf.config.rewards import RemoteSourceConfig
from rlhf.evaluation import response_rows, score_responses, score_sequences
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve
from rlhf.reward_client import RewardClient, ServedModelChanged
from rlhf.tasks.subtraction import PROMPT
from rlhf.tracking import read_metrics

# slow: every test starts a reward server process (one also trains PPO against it)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A reward model directory, as stage 2 writes one (a test-sized random model with its head)."""
    out = tmp_path_factory.mktemp("rm")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    model = build_scalar_model(source, ModelInit(), tokenizer, seed=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ from one text to the next
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def start_server(model_dir, port: int = 0, batch_size: int = 8, *flags: str) -> tuple[subprocess.Popen, str]:
    """`launch/serve_rm.py` in its own process; (process, base URL) once it says it is serving."""
    cmd = [sys.executable, str(ROOT / "launch/serve_rm.py"), str(model_dir), "--port", str(port)]
    cmd += ["--batch-size", str(batch_size), *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy()
    )
    line = proc.stdout.readline()  # printed once the model is loaded and the port bound
    assert line.startswith("serving "), f"server did not start (exit {proc.poll()}): {line!r}"
    return proc, line.split(" on ")[1].split("/score")[0]


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_scores_over_http_equal_local_scores(rm_dir):
    proc, base = start_server(rm_dir, batch_size=8)
    try:
        prompts = [[{"role": "user", "content": PROMPT % (x, y)}] for x, y in [(52, 17), (3, 40), (1000, 1)] * 4]
        responses = ["35", "-37", "999", "3 5", "", "-35", "42", "100", "999", "x", "0", "-1"]
        source = resolve(str(rm_dir))
        tokenizer = load_tokenizer(source, ModelInit())
        model = build_scalar_model(source, ModelInit(), tokenizer).eval()
        local = score_responses(model, tokenizer, prompts, responses).tolist()
        assert len(set(local)) > 1

        # three clients at once, four requests of three each: the server scores them in batches
        def ask(i: int) -> list[float]:
            chunk = slice(3 * i, 3 * i + 3)
            return post(f"{base}/score", {"prompts": prompts[chunk], "responses": responses[chunk]})["scores"]

        with ThreadPoolExecutor(3) as pool:
            remote = [s for scores in pool.map(ask, range(4)) for s in scores]
        assert remote == pytest.approx(local, abs=1e-5)
        # a string prompt is one user message; token ids are scored as they are
        strings = post(f"{base}/score", {"prompts": [p[0]["content"] for p in prompts], "responses": responses})
        assert strings["scores"] == pytest.approx(local, abs=1e-5)
        rows = response_rows(tokenizer, prompts, responses)
        by_ids = post(f"{base}/score", {"input_ids": rows})["scores"]
        assert by_ids == pytest.approx(score_sequences(model, rows, tokenizer.pad_token_id).tolist(), abs=1e-5)

        health = get(f"{base}/health")
        assert health["status"] == "ok" and health["scored"] == 36 and health["batches"] <= 4 + 2 + 2
        with pytest.raises(urllib.error.HTTPError) as e:
            post(f"{base}/score", {"prompts": prompts, "responses": responses[:2]})
        assert e.value.code == 400 and "same length" in json.loads(e.value.read())["error"]
    finally:
        stop(proc)


def test_ppo_with_a_remote_reward_model_stops_when_it_dies_and_resumes(rm_dir, policy_dir, tmp_path):
    proc, base = start_server(rm_dir)
    url, out = f"{base}/score", tmp_path / "ppo"
    args = [f"policy={policy_dir}", "reward_model=null", "reward.sources.rm=null", *FAST, f"output_dir={out}"]
    args += [f'reward.sources.served={{kind: remote, url: "{url}"}}', "reward.sources.served.retries=1"]
    args += [
        "reward.sources.served.backoff=0.1",
        "reward.sources.served.timeout=30",
        "train.max_steps=4",
        "train.save_every=2",
        "train.log_every=1",
    ]
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/stage3_ppo.py"), *tiny_config("launch/stage3_ppo.py", args), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "step-2" / "COMPLETE").exists():
            assert run.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
            time.sleep(0.02)
        stop(proc)  # the server dies mid-run
        _, stderr = run.communicate(timeout=600)
    finally:
        stop(proc)
        if run.poll() is None:
            stop(run)
    assert run.returncode == 3, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward server ") and url in last and "did not answer after 2 tries" in last, last
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert kept and not (out / "manifest.json").exists()

    port = int(base.rsplit(":", 1)[1])
    # a server restarted with another reward model is refused on resume, in one line, checkpoints intact
    checkpoints = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    proc, _ = start_server("tiny-llama", port=port)
    try:
        refused = run_entry("launch/stage3_ppo.py", *args, timeout=600)
    finally:
        stop(proc)
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: reward server {url} scores with another model"), last
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == checkpoints

    proc, _ = start_server(rm_dir, port=port)  # the same model back on the same address
    # a longer time-out after the failure resumes the run: the client's patience is not in the checkpoint hash
    args = [a.replace("reward.sources.served.timeout=30", "reward.sources.served.timeout=45") for a in args]
    try:
        resumed = run_entry("launch/stage3_ppo.py", *args, timeout=600)
        served = get(f"{base}/health")["scored"]
    finally:
        stop(proc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / kept[-1]}" in resumed.stderr
    resumed_at = int(kept[-1].split("-")[1])
    assert served == (4 - resumed_at) * 16  # every remaining step's 16 episodes were scored over HTTP
    assert json.loads((out / "manifest.json").read_text())["finished"]
    records = [r for r in read_metrics(out / "metrics.jsonl") if "train/reward/served" in r]
    assert [r["step"] for r in records[resumed_at - 4 :]] == list(range(resumed_at + 1, 5))
    for r in records:  # the sequence score is the remote one (weight 1), less 1 for a response without EOS
        assert r["train/ppo/score"] == pytest.approx(r["train/reward/served"] - (1 - r["train/ppo/eos_rate"]), abs=1e-5)


class FakeServer(BaseHTTPRequestHandler):
    """launch/serve_rm.py's API without a model: every score is the response's length; keeps
    count of the connections opened and the fingerprints sent."""

    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def setup(self):
        super().setup()
        self.server.connections += 1

    def do_GET(self):
        self._send(200, {"status": "ok", "fingerprint": self.server.fingerprint})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        sent = self.headers.get("X-Reward-Fingerprint")
        self.server.sent.append(sent)
        if sent and sent != self.server.fingerprint:
            return self._send(409, {"error": "another model", "fingerprint": self.server.fingerprint})
        self._send(200, {"scores": [float(len(r)) for r in body["responses"]], "fingerprint": self.server.fingerprint})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    server.connections, server.sent, server.fingerprint = 0, [], "aaaa"
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_client_pools_one_connection_ignores_proxies_and_sends_the_fingerprint(fake_server, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # a proxy that cannot reach this machine
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    cfg = RemoteSourceConfig(kind="remote", url=f"http://127.0.0.1:{fake_server.server_port}/score", retries=0)
    client = RewardClient(cfg)
    assert client.connect() == "aaaa"
    assert client.check(None) == "aaaa"  # a fresh run records it
    prompts = [[{"role": "user", "content": "1 - 1 ="}]] * 2
    for _ in range(3):
        assert client.scores(prompts, ["0", "-10"]) == [1.0, 3.0]
    assert fake_server.connections == 1  # one pooled connection for /health and three requests
    assert fake_server.sent == ["aaaa"] * 3

    fake_server.fingerprint = "bbbb"  # restarted with another reward model: refused mid-run, not retried
    with pytest.raises(ServedModelChanged, match=r"another model \(fingerprint bbbb\) than this run was scored with"):
        client.scores(prompts, ["0", "1"])
    resumed = RewardClient(cfg)  # and on resume
    resumed.connect()
    with pytest.raises(ServedModelChanged, match="aaaa"):
        resumed.check("aaaa")
    client.close()
    resumed.close()


def test_client_patience_is_not_part_of_the_config_or_checkpoint_hash():
    def ppo(*overrides):
        return load_config(PPOStageConfig, str(ROOT / "configs/tiny/ppo.yaml"), list(overrides))

    url = 'reward.sources.served={kind: remote, url: "http://127.0.0.1:1/score"}'
    cfg, moved = ppo(url), ppo('reward.sources.served={kind: remote, url: "http://127.0.0.1:2/score"}')
    # raised after a failure: the run resumes instead of starting again from step 0
    patience = [
        "reward.sources.served.timeout=600",
        "reward.sources.served.retries=9",
        "reward.sources.served.backoff=5",
    ]
    patient = ppo(url, *patience)
    assert patient.reward.sources["served"].timeout == 600
    assert config_hash(patient, NOT_HASHED) == config_hash(cfg, NOT_HASHED)
    assert checkpoint_digest(patient, ()) == checkpoint_digest(cfg, ())
    assert checkpoint_digest(moved, ()) != checkpoint_digest(cfg, ())
