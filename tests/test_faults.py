"""A fault battery run as a user would, through the real commands (launch/stage*.py): each fault
ends with one line on stderr (exit 2, or 3 for non-finite values), the previous output of the
stage stays byte-for-byte as it was, and nothing half-written is left. Also: checkpoints are
tied to what changes the weights (changing how often a run logs or saves resumes it; changing
the learning rate moves the old checkpoints aside, still on disk), and a second run on one
output directory stops at once, naming the first.

One finished output per stage (module fixtures, a few steps of test-sized models) serves every
fault; tests that must change an output work on a copy."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_reward_server import start_server, stop

from conftest import ROOT, run_entry, tiny_config
from rlhf.checkpoint import checkpoint_step
from rlhf.reward_server import Limits, Scorer, http_server, listen
from rlhf.tracking import read_metrics

# slow: every test runs the real commands on stages trained here
pytestmark = pytest.mark.slow

QUIET = ["tracking.report_to=[]", "tracking.progress=false"]
SFT = [
    "model=tiny-llama",
    "task.train_size=256",
    "task.eval_size=8",
    "task.test_per_bucket=4",
    "train.batch_size=8",
    "train.max_steps=4",
    "train.save_every=2",
    "train.log_every=1",
    "optim.warmup_ratio=0",
    "evaluate_base=false",
    *QUIET,
]
RM = [
    "pairs.train_size=128",
    "pairs.eval_size=16",
    "pairs.onpolicy_fraction=0",
    "train.batch_size=8",
    "train.max_steps=4",
    "train.save_every=2",
    "train.log_every=1",
    "optim.warmup_ratio=0",
    *QUIET,
]
PPO = [
    "task.train_size=64",
    "task.eval_size=8",
    "task.test_per_bucket=4",
    "rollout.prompts_per_step=8",
    "ppo.minibatches=2",
    "rollout.generation.max_new_tokens=4",
    "generation.max_new_tokens=4",
    "train.max_steps=2",
    "train.save_every=1",
    "train.log_every=1",
    "ppo.value_warmup_steps=0",
    *QUIET,
]
SCRIPTS = {"sft": "launch/stage1_sft.py", "rm": "launch/stage2_rm.py", "ppo": "launch/stage3_ppo.py"}


def stage(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = {"sft": SFT, "rm": RM, "ppo": PPO}[name]
    return run_entry(SCRIPTS[name], *args, *extra, f"output_dir={out}", timeout=600)


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, hidden ones (the lock) included."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-3000:]
    for word in words:
        assert word in line, line
    return line


def finish(name: str, out: Path, *extra: str) -> Path:
    result = stage(name, out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["finished"]
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finished")


@pytest.fixture(scope="module")
def sft_out(root) -> Path:
    return finish("sft", root / "sft")


@pytest.fixture(scope="module")
def rm_out(root, sft_out) -> Path:
    return finish("rm", root / "rm", f"model={sft_out}")


@pytest.fixture(scope="module")
def ppo_out(root, sft_out, rm_out) -> Path:
    return finish("ppo", root / "ppo", f"policy={sft_out}", f"reward_model={rm_out}")


@pytest.fixture
def outputs(request) -> dict[str, Path]:
    """The finished outputs a test's stage needs (each made once per module, on first use)."""
    name = request.node.callspec.params.get("name", "sft") if hasattr(request.node, "callspec") else "sft"
    needs = {"sft": ["sft"], "rm": ["sft", "rm"], "ppo": ["sft", "rm", "ppo"]}[name]
    return {n: request.getfixturevalue(f"{n}_out") for n in needs}


def inputs_of(name: str, outputs: dict[str, Path]) -> tuple[str, ...]:
    if name == "rm":
        return (f"model={outputs['sft']}",)
    if name == "ppo":
        return (f"policy={outputs['sft']}", f"reward_model={outputs['rm']}")
    return ()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "sft.jsonl").write_text('{"prompt": "1-1=", "completion": "0"}\n{"prompt": "2-1=", "completion": \n')
    (d / "pairs.jsonl").write_text('{"prompt": "1-1=", "chosen": "0"}\n')  # no rejected answer
    return {"sft": d / "sft.jsonl", "rm": d / "pairs.jsonl", "ppo": d / "sft.jsonl"}


# item 15: a bad input leaves the finished output as it was, byte for byte
@pytest.mark.parametrize("name", ["sft", "rm", "ppo"])
def test_bad_data_file_leaves_the_output_intact(name, outputs, bad_files):
    before = snapshot(outputs[name])
    result = stage(name, outputs[name], *inputs_of(name, outputs), f"data.train={bad_files[name]}")
    one_line_error(result, 2, bad_files[name].name)
    assert snapshot(outputs[name]) == before


@pytest.mark.parametrize("name", ["sft", "rm", "ppo"])
def test_unknown_model_leaves_the_output_intact(name, outputs):
    before = snapshot(outputs[name])
    key = {"sft": "model", "rm": "model", "ppo": "reward_model"}[name]
    result = stage(name, outputs[name], *inputs_of(name, outputs), f"{key}=no-such-model-anywhere")
    one_line_error(result, 2, "no-such-model-anywhere")
    assert snapshot(outputs[name]) == before


# item 21: a corrupt manifest of an input is one line naming the file
def test_corrupt_input_manifest_is_one_line_naming_the_file(sft_out, rm_out, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(sft_out, sft)
    (sft / "manifest.json").write_text('{"stage": "sft", "finished": tr')
    before = snapshot(rm_out)
    result = stage("rm", rm_out, f"model={sft}")
    one_line_error(result, 2, str(sft / "manifest.json"))
    assert snapshot(rm_out) == before


# item 18: a diverging run stops with exit 3; nothing is saved as finished, complete checkpoints stay
@pytest.mark.parametrize("name", ["sft", "rm"])
def test_diverging_run_exits_3_and_keeps_the_last_good_checkpoint(name, outputs, tmp_path):
    # warm-up from 0: step 1 runs at lr 0 (checkpoint-1 is the start, finite), step 2 at ~1e29
    # sends the weights to ~1e29, and step 3's gradients overflow
    out = tmp_path / name
    extra = ["optim.lr=1e30", "optim.warmup_ratio=0.5", "optim.max_grad_norm=null", "train.save_every=1"]
    result = stage(name, out, *inputs_of(name, outputs), *extra)
    one_line_error(result, 3, "non-finite")
    assert not (out / "manifest.json").exists()
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*") if (p / "COMPLETE").is_file())
    assert kept and "checkpoint-4" not in kept, kept


# item 17: keys that cannot change the weights do not invalidate checkpoints; others move them aside
def test_changing_how_often_a_run_logs_or_saves_resumes_it(outputs, tmp_path):
    out = tmp_path / "sft"
    shutil.copytree(outputs["sft"], out)
    result = stage("sft", out, "train.save_every=3", "train.log_every=2", "train.keep_checkpoints=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint-4" in result.stderr
    assert not list(tmp_path.glob("sft/checkpoints.stale-*"))


def test_changing_the_learning_rate_moves_old_checkpoints_aside(outputs, tmp_path):
    out = tmp_path / "sft"
    shutil.copytree(outputs["sft"], out)
    old = snapshot(out / "checkpoints")
    result = stage("sft", out, "optim.lr=2e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" not in result.stderr
    (stale,) = out.glob("checkpoints.stale-*")
    assert snapshot(stale) == old  # still on disk, as they were
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()  # and a fresh run wrote its own


# item 16: two runs on one output directory
def test_second_run_on_one_output_stops_at_once_naming_the_first(outputs, tmp_path):
    out = tmp_path / "sft"
    # long enough that the first run is still training when the second one has started and checked
    cmd = [sys.executable, str(ROOT / SCRIPTS["sft"]), *tiny_config(SCRIPTS["sft"], SFT), *SFT]
    cmd += ["train.max_steps=5000", "train.save_every=1000"]
    first = subprocess.Popen([*cmd, f"output_dir={out}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / ".lock").is_file() or not (out / ".lock").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run ended before it started training"
            time.sleep(0.05)
        t0 = time.time()
        second = stage("sft", out, "train.max_steps=5000", "train.save_every=1000")
        assert first.poll() is None, "the first run ended before the second one checked: the test proves nothing"
        one_line_error(second, 2, "in use", f"pid {first.pid}")
        assert time.time() - t0 < 60
        assert not (out / "manifest.json").exists()  # the first run is still the only writer
    finally:
        first.kill()
        first.communicate(timeout=120)


# a crash after the final checkpoint, before the manifest: the same command again resumes at the
# last step and trains no further (the Trainer used to take one more step and save checkpoint-5)
LAST_STEP = {"sft": 4, "rm": 4, "ppo": 2}


@pytest.mark.parametrize("name", ["sft", "rm", "ppo"])
def test_rerun_from_the_final_checkpoint_trains_no_further(name, outputs, tmp_path):
    out = tmp_path / name
    shutil.copytree(outputs[name], out)
    (out / "manifest.json").unlink()  # what a crash between the last checkpoint and the manifest leaves
    weights = {p.relative_to(out): load_file(p) for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts}
    result = stage(name, out, *inputs_of(name, outputs))
    assert result.returncode == 0, result.stderr[-3000:]
    last = LAST_STEP[name]
    assert re.search(rf"resum\w+ from \S+(checkpoint|step)-{last}\b", result.stderr), result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["finished"]
    saved = [checkpoint_step(p) for p in (out / "checkpoints").iterdir() if checkpoint_step(p) is not None]
    assert max(saved) == last, saved
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == last
    for path, before in weights.items():  # the final checkpoint's weights, saved again as they were
        after = load_file(out / path)
        assert all(torch.equal(before[k], after[k]) for k in before), path


# issue 25, item 15: the reward server (launch/serve_rm.py). One bad request is refused on its own
# with a one-line 4xx; the server keeps serving every other request, including those batched with it.
@pytest.fixture(scope="module")
def gpt2_server():
    """The served tiny GPT-2 preset: absolute positions (512), so a longer row used to crash its batch."""
    proc, base = start_server("tiny-gpt2", 0, 64, "--idle-timeout", "2")
    client = httpx.Client(base_url=base, trust_env=False, timeout=120)
    yield client
    client.close()
    stop(proc)


def raw_exchange(base: str, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_reward_server_refuses_a_huge_body_unread_and_deep_nesting(gpt2_server):
    base = str(gpt2_server.base_url).rstrip("/")
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000000\r\n\r\n"
    answer = raw_exchange(base, head)  # used to be an uncaught MemoryError and a dropped connection
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"at most" in answer
    deep = gpt2_server.post("/score", content=b"[" * 100_000 + b"]" * 100_000)  # used to be a RecursionError
    assert deep.status_code == 400 and "nests deeper" in deep.json()["error"], deep.text[:300]
    health = gpt2_server.get("/health").json()
    assert health["status"] == "ok"
    assert health["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # the GPU when there is one


def test_reward_server_isolates_a_bad_request_and_truncates_long_rows(gpt2_server):
    good = {"prompts": ["52 - 17 =", "3 - 40 ="], "responses": ["35", "-37"]}
    robot = {"prompts": [[{"role": "robot", "content": "1 - 1 ="}]], "responses": ["0"]}  # the template refuses it
    long_row = [(7 * i) % 50 + 10 for i in range(700)]  # past GPT-2's 512 positions

    def ask(payload):
        return gpt2_server.post("/score", json=payload)

    expected = ask(good).json()["scores"]
    with ThreadPoolExecutor(3) as pool:  # at once, so that they share a batch
        answers = list(pool.map(ask, [good, robot, {"input_ids": [long_row]}] * 3))
    for a in answers[0::3]:
        assert a.status_code == 200 and a.json()["scores"] == pytest.approx(expected, abs=1e-5)
    for a in answers[1::3]:
        assert a.status_code == 400 and "unknown chat role: robot" in a.json()["error"], a.text[:300]
        assert "\n" not in a.json()["error"]
    cut = ask({"input_ids": [long_row[:512]]}).json()["scores"]
    for a in answers[2::3]:  # scored as its first 512 tokens, as OpenRLHF's server truncates to --max_len
        assert a.status_code == 200 and a.json()["scores"] == pytest.approx(cut, abs=1e-5)
    assert gpt2_server.get("/health").json()["truncated"] >= 3


def test_reward_server_closes_idle_connections(gpt2_server):
    base = str(gpt2_server.base_url).rstrip("/")
    t0 = time.time()
    assert raw_exchange(base, b"") == b""  # says nothing: closed after --idle-timeout 2
    assert raw_exchange(base, b"POST /sco") == b""  # headers that never end: the same
    assert time.time() - t0 < 15


def test_reward_server_cancels_the_jobs_of_clients_that_left_or_timed_out(monkeypatch):
    # in this process, with the worker held at the first request, so that the others must wait
    scorer = Scorer("tiny-gpt2", batch_size=64)
    entered, release, score = threading.Event(), threading.Event(), scorer._score

    def held(jobs):
        entered.set()
        release.wait(60)
        score(jobs)

    monkeypatch.setattr(scorer, "_score", held)
    sock = listen("127.0.0.1", 0)
    server = http_server(scorer, Limits(request_timeout=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = httpx.Client(base_url=base, trust_env=False, timeout=60)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/score", json={"input_ids": [[11, 12, 13]] * 4})
            assert entered.wait(30)  # the worker is scoring the first request
            body = json.dumps({"input_ids": [[11, 12, 13, 14]]}).encode()
            with socket.create_connection(sock.getsockname()[:2], timeout=30) as s:  # a client that leaves
                s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.2)
            waited = pool.submit(client.post, "/score", json={"input_ids": [[15, 16]] * 2})  # one that waits too long
            assert waited.result().status_code == 503 and "cancelled" in waited.result().json()["error"]
            release.set()
            first.result()
        # the worker drops the cancelled jobs when it next takes from the queue, just after the first
        # request's answer went out: wait for that rather than race it
        deadline = time.time() + 30
        while (health := client.get("/health").json())["queued"] and time.time() < deadline:
            time.sleep(0.05)
        assert health["cancelled"] >= 2 and health["queued"] == 0
        assert health["scored"] == 4 and health["batches"] == 1  # the jobs left behind were never scored
    finally:
        release.set()
        client.close()
        server.should_exit = True
        thread.join(30)


# The pipeline's own faults: one line on stderr, exit code 2, nothing created.
@pytest.mark.parametrize(
    "text, words",
    [
        (None, "cannot read"),
        ("name: [a\n", "not valid YAML"),
        ("name: a\nname: b\n", "duplicate key 'name'"),
        ("- sft\n", "must hold a mapping"),
        ("rounds: 0\n", "rounds"),
    ],
)
def test_a_missing_or_invalid_pipeline_yaml_is_one_line(tmp_path, text, words):
    path = tmp_path / "pipeline.yaml"
    if text is not None:
        path.write_text(text)
    result = run_entry("launch/pipeline.py", "--config", str(path), f"runs_dir={tmp_path / 'runs'}", timeout=120)
    one_line_error(result, 2, words)
    assert not (tmp_path / "runs").exists()


# The label stage (rounds > 1): a labeller that raises and too few prompts are one line, exit 2,
# and an earlier label output stays as it was.
LABEL = ["reward_model=null", "prompts=8", "eval_prompts=4", "task.train_size=32", "generation.max_new_tokens=4"]
LABEL += ["labeller.name=function"]
TESTS_ON_PATH = {"PYTHONPATH": str(ROOT / "tests")}


@pytest.fixture(scope="module")
def label_out(root) -> tuple[Path, Path]:
    from rlhf.config import ModelInit
    from rlhf.registry import build_policy, load_tokenizer, resolve

    policy, out = root / "label-policy", root / "label"
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    args = [*LABEL, "labeller.function=test_labellers:prefer_shorter", f"policy={policy}", f"output_dir={out}"]
    result = run_entry("launch/stage2_label.py", *args, timeout=600, env=TESTS_ON_PATH)
    assert result.returncode == 0, result.stderr[-3000:]
    return policy, out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["labeller.function=test_labellers:refuse"], ("labeller 'test_labellers:refuse' raised KeyError",)),
        (["labeller.function=test_labellers:prefer_shorter", "prompts=40"], ("holds 32 prompts",)),
    ],
)
def test_a_failing_label_stage_is_one_line_and_keeps_the_earlier_output(label_out, tmp_path, extra, words):
    policy, finished = label_out
    out = tmp_path / "label"
    shutil.copytree(finished, out)
    before = snapshot(out)
    args = [*LABEL, *extra, f"policy={policy}", f"output_dir={out}"]
    result = run_entry("launch/stage2_label.py", *args, timeout=600, env=TESTS_ON_PATH)
    one_line_error(result, 2, *words)
    assert snapshot(out) == before


def test_a_forced_rerun_checks_the_stage_lock_first_and_moves_checkpoints_aside(tmp_path):
    # --only / --from-stage deleted a live run's checkpoints before the stage found its lock held.
    from rlhf.pipeline import start_afresh

    out = tmp_path / "runs" / "x" / "ppo"
    step = out / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("done\n")
    hold = "import sys, time; from pathlib import Path; from rlhf.checkpoint import lock_output\n"
    hold += "lock_output(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_entry("launch/pipeline.py", f"runs_dir={tmp_path / 'runs'}", "name=x", "--only", "ppo")
    finally:
        holder.kill()
        holder.wait()
    one_line_error(result, 2, "in use by another run")
    assert (step / "COMPLETE").is_file()
    # the lock free: moved aside, not deleted
    moved = start_afresh(out)
    assert moved.name.startswith("checkpoints.forced-") and (moved / "step-2" / "COMPLETE").is_file()
    assert not (out / "checkpoints").exists()
