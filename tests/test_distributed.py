"""Every stage under DDP, DeepSpeed ZeRO-2 and ZeRO-3, on CPU with two processes (gloo): a few
steps, a loadable model at the end, metrics from both processes. PPO under ZeRO-3 generates and
updates (its weights are gathered once per rollout for generation)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ROOT

# slow: every test launches two to four training processes (DDP, ZeRO-2/3, two nodes)
pytestmark = pytest.mark.slow

pytest.importorskip("deepspeed")

MODES = {
    "ddp": "configs/accelerate/ddp.yaml",
    "zero2": "configs/accelerate/zero2.yaml",
    "zero3": "configs/accelerate/zero3.yaml",
}
MULTINODE = "configs/accelerate/multinode.yaml"
COMMON = ["tracking.report_to=[]", "tracking.progress=false"]
STAGE_ARGS = {
    "sft": [
        "model=tiny-llama",
        "task.train_size=256",
        "task.eval_size=8",
        "task.test_per_bucket=4",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.save_every=2",
        "train.log_every=1",
        "evaluate_base=false",
    ],
    "rm": [
        "pairs.train_size=128",
        "pairs.eval_size=16",
        "pairs.onpolicy_fraction=0",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.save_every=2",
        "train.log_every=1",
    ],
    "ppo": [
        "task.train_size=64",
        "task.eval_size=8",
        "task.test_per_bucket=4",
        "rollout.prompts_per_step=8",
        "ppo.minibatches=2",
        "rollout.generation.max_new_tokens=4",
        "generation.max_new_tokens=4",
        "train.max_steps=3",
        "train.save_every=2",
        "train.log_every=1",
        "train.eval_every=2",
        "ppo.value_warmup_steps=0",
    ],
}
SCRIPTS = {"sft": "launch/stage1_sft.py", "rm": "launch/stage2_rm.py", "ppo": "launch/stage3_ppo.py"}


def launch(mode: str, stage: str, out, *extra, ok: bool = True, env: dict | None = None):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / MODES[mode]),
        "--num_processes",
        "2",
        "--main_process_port",
        str(29500 + hash((mode, stage)) % 1000),
        str(ROOT / SCRIPTS[stage]),
        "--config",
        str(ROOT / f"configs/tiny/{stage}.yaml"),
        *STAGE_ARGS[stage],
        *COMMON,
        f"output_dir={out / stage}",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert (result.returncode == 0) == ok, f"{mode}/{stage}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def three_stages(mode: str, out) -> dict[str, subprocess.CompletedProcess]:
    """SFT, then the RM on its output, then PPO on both, each under `mode` with two processes.
    The RM's LM loss (loss.lm_coef, on in the tiny config) runs under DDP and ZeRO-2; ZeRO-3
    refuses it (see below), so it is off there."""
    results = {"sft": launch(mode, "sft", out)}
    no_lm = ["loss.lm_coef=0"] if mode == "zero3" else []
    results["rm"] = launch(mode, "rm", out, f"model={out / 'sft'}", *no_lm)
    results["ppo"] = launch(mode, "ppo", out, f"policy={out / 'sft'}", f"reward_model={out / 'rm'}")
    return results


@pytest.fixture(scope="module")
def one_node_zero3(tmp_path_factory):
    """The three stages under ZeRO-3, one node, two processes: checked on their own below, and the
    reference the two-node run must match."""
    out = tmp_path_factory.mktemp("zero3")
    return out, three_stages("zero3", out)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_stage_distributed(mode, tmp_path, request):
    if mode == "zero3":
        out, results = request.getfixturevalue("one_node_zero3")
    else:
        out, results = tmp_path, three_stages(mode, tmp_path)
    sft = AutoModelForCausalLM.from_pretrained(out / "sft")
    assert json.loads((out / "sft" / "manifest.json").read_text())["finished"]

    if mode == "zero3":  # the RM's LM loss is refused under ZeRO-3 with a config error before training
        refused = launch(mode, "rm", tmp_path / "refused", f"model={out / 'sft'}", ok=False)
        assert "loss.lm_coef" in refused.stderr and "ZeRO-3" in refused.stderr
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and (out / "rm" / "eval.json").is_file()
    assert ("train/rm/lm_loss" in (out / "rm" / "metrics.jsonl").read_text()) == (mode != "zero3")

    ppo = AutoModelForCausalLM.from_pretrained(out / "ppo")
    before, after = sft.state_dict(), ppo.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "PPO changed nothing"
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/ppo/score" in r]
    assert len(steps) == 3 and all(r["train/ppo/episodes_per_s"] > 0 for r in steps)
    assert (out / "ppo" / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert any("eval/ppo/accuracy" in r for r in records)  # evaluation split over both processes
    assert "Traceback" not in results["ppo"].stderr

    if mode == "zero3":  # the value head on the policy's sharded trunk: one module, saved beside it
        shared = tmp_path / "shared"
        launch(
            mode,
            "ppo",
            shared,
            f"policy={out / 'sft'}",
            f"reward_model={out / 'rm'}",
            "share_policy_trunk=true",
        )
        head = load_file(shared / "ppo" / "value_head.safetensors")
        assert (
            head["score.weight"].shape == (1, sft.config.hidden_size) and not (shared / "ppo" / "value_model").exists()
        )


def test_advantage_whitening_and_explained_variance_are_global(tmp_path):
    """Two processes (gloo) each holding part of a batch whiten their advantages and compute the
    explained variance with the whole batch's statistics, as one process holding it all would."""
    out = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / MODES["ddp"])]
    cmd += ["--num_processes", "2", "--main_process_port", "29731", str(ROOT / "tests/two_process_stats.py"), str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert json.loads(out.read_text()) == {
        "whitening_matches": True,
        "explained_variance_matches": True,
        "per_process_differs": True,
    }


def test_nonfinite_run_under_zero3_exits_3_on_every_process(tmp_path):
    """Item 21 (and 18 under DeepSpeed): a two-process ZeRO-3 stage that raises ends cleanly, with
    the stage's own exit code (3: non-finite), no hang and no abort in the process group's teardown."""
    status = tmp_path / "exit_code"
    cmd_env = {"RLHF_EXIT_STATUS_FILE": str(status), "RLHF_PG_TIMEOUT_S": "120"}
    extra = ["optim.lr=1e30", "optim.warmup_ratio=0.5", "optim.max_grad_norm=null", "train.save_every=1"]
    result = launch("zero3", "sft", tmp_path, *extra, ok=False, env=cmd_env)
    assert status.read_text().strip() == "3", result.stderr[-3000:]
    assert "non-finite" in result.stderr and "terminate called" not in result.stderr
    assert not (tmp_path / "sft" / "manifest.json").exists()


def _node(rank: int, cwd, port: int, *args: str) -> subprocess.Popen:
    """One process of a two-node job started by hand, as a launcher on each node would start it
    (torchrun's environment), in its own working directory: two nodes without a shared disk."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RLHF_NUM_THREADS": "1",
        "RLHF_PG_TIMEOUT_S": "60",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    cmd = [sys.executable, str(ROOT / SCRIPTS["sft"]), "--config", str(ROOT / "configs/tiny/sft.yaml")]
    cmd += [*STAGE_ARGS["sft"], *COMMON, "output_dir=out", "train.keep_checkpoints=5", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _both(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a rank hung: the ranks resumed from different steps") from None
        out.append((proc.returncode, err))
    return out


def test_nodes_without_a_shared_disk_are_refused_with_nothing_lost(tmp_path):
    """Two nodes, each with its own disk (each process in its own working directory). Checkpoints
    are renamed, pruned and marked complete by global rank 0 alone, so node 1's copy lagged and a
    resume there read another step's state (docs/ppo.md said this worked). Every rank now stops at
    the start with one line naming output_dir, exit 2, and node 0's files stay as they were. On
    one disk the same two processes train and resume the checkpoint rank 0 chose."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    port = 29400 + os.getpid() % 500
    done = _both([_node(0, node1, port), _node(1, node1, port)])  # both on one disk: checkpoints 2 and 4
    assert all(code == 0 for code, _ in done), done[0][1][-3000:] + done[1][1][-3000:]
    shutil.copytree(node1, node0)
    before = {str(f.relative_to(node0)): f.read_bytes() for f in sorted(node0.rglob("*")) if f.is_file()}

    done = _both([_node(0, node0, port + 1), _node(1, node1, port + 1)])
    for code, err in done:
        assert code == 2, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "output_dir" in line and "rank 1 does not see" in line, line
    after = {str(f.relative_to(node0)): f.read_bytes() for f in sorted(node0.rglob("*")) if f.is_file()}
    assert after == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(stage: str, out, logs, *extra: str) -> None:
    """One stage started as a user starts two nodes with configs/accelerate/multinode.yaml: the same
    `accelerate launch` on each node, machine_rank 0 and 1, one process each, rendezvous at node
    0's address. Here both nodes are this machine (127.0.0.1, a free port) and share its disk."""
    port, procs = _free_port(), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1", "RLHF_PG_TIMEOUT_S": "120"}
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / MULTINODE)]
        cmd += ["--machine_rank", str(rank), "--num_machines", "2", "--num_processes", "2"]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(ROOT / SCRIPTS[stage])]
        cmd += ["--config", str(ROOT / f"configs/tiny/{stage}.yaml"), *STAGE_ARGS[stage], *COMMON, *extra]
        cmd.append(f"output_dir={out / stage}")
        log = open(logs / f"{stage}-node{rank}.log", "w")  # files, not pipes: a full pipe would stall a rank
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    tails = "\n".join((logs / f"{stage}-node{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert codes == [0, 0], f"{stage}: exit codes {codes}\n{tails}"
    assert "Traceback" not in tails and "terminate called" not in tails, tails


NOT_REPRODUCIBLE = re.compile(r"(^perf/|_per_s|_per_second|runtime|time|wall|flos)")  # timings, memory: run to run


def _weight_files(output) -> list:
    return sorted(p.relative_to(output) for p in output.rglob("*.safetensors") if "checkpoints" not in p.parts)


def assert_same_run(a, b) -> None:
    """Two outputs of one stage are the same run: every weight file holds the same tensors (to
    1e-6) and metrics.jsonl the same records, timings aside."""
    weights = _weight_files(a)
    assert weights and weights == _weight_files(b)
    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.allclose(x[key], y[key], rtol=0, atol=1e-6), f"{name}: {key}"
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(records[0]) == len(records[1]) > 0
    for x, y in zip(*records, strict=True):
        keys = {k for k in x if isinstance(x[k], (int, float)) and not NOT_REPRODUCIBLE.search(k)}
        assert keys == {k for k in y if isinstance(y[k], (int, float)) and not NOT_REPRODUCIBLE.search(k)}
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (a.name, x["step"], key)


def test_two_nodes_match_one_node(one_node_zero3, tmp_path):
    """Item 23: configs/accelerate/multinode.yaml (DeepSpeed ZeRO-3 over two nodes) started as a user
    would on two nodes, one process each, gloo on CPU: SFT, RM and PPO each finish on both nodes
    with the outputs of one node running two processes (same inputs, same ranks, same shards)."""
    one, _ = one_node_zero3
    two, logs = tmp_path / "two", tmp_path / "logs"
    logs.mkdir()
    two_nodes("sft", two, logs)
    two_nodes("rm", two, logs, f"model={one / 'sft'}", "loss.lm_coef=0")
    two_nodes("ppo", two, logs, f"policy={one / 'sft'}", f"reward_model={one / 'rm'}")
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((two / stage / "manifest.json").read_text())["finished"]
        assert_same_run(one / stage, two / stage)


def test_in_loop_evaluation_on_four_processes_counts_every_item_once(tmp_path):
    """Item 3: PPO's in-loop evaluation on 4 processes (gloo) of 9 held-out items, which do not
    split evenly: every item is counted once (accuracy 3/9 by construction, see
    tests/four_process_eval.py; slicing the padded gather loses item 7 and counts item 8 twice:
    2/9), and the reward model's mean score is that of the 9 answers."""
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / MODES["ddp"])]
    cmd += ["--num_processes", "4", "--main_process_port", str(_free_port())]
    cmd += [str(ROOT / "tests/four_process_eval.py"), str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got["processes"] == 4
    expected, in_loop = got["expected"], got["in_loop"]
    assert in_loop["eval/ppo/n"] == expected["eval/ppo/n"] == 9
    assert in_loop["eval/ppo/accuracy"] == expected["eval/ppo/accuracy"] == 0.3333  # 3/9
    assert in_loop["eval/ppo/rm_score"] == pytest.approx(expected["eval/ppo/rm_score"], abs=1e-5)


def test_lora_stages_under_zero3_save_the_adapter_and_its_merged_weights(tmp_path):
    """With LoRA under ZeRO-3, SFT saves the adapter and merged weights equal to base + (alpha / r)
    * B @ A by hand, and the RM on it and PPO on both run (the models are partitioned across the
    processes; merging an adapter into them crashed on their empty shards)."""
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.merge_on_save=true"]
    launch("zero3", "sft", tmp_path, *lora)
    sft = tmp_path / "sft"
    adapter = load_file(sft / "adapter_model.safetensors")
    base = load_file(sft / "base_model" / "model.safetensors")
    merged = load_file(sft / "merged" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    assert b.abs().sum() > 0, "the adapter never trained"
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 2.0 * b @ a)

    # the RM without merged weights: later stages merge its adapter themselves
    launch("zero3", "rm", tmp_path, f"model={sft}", "loss.lm_coef=0", *lora, "lora.merge_on_save=false")
    assert (tmp_path / "rm" / "adapter_model.safetensors").is_file() and not (tmp_path / "rm" / "merged").exists()

    # PPO loads the SFT model's merged weights (straight into shards) and merges the RM's adapter
    # into its reward and value models (built whole, then partitioned), and trains a LoRA of its own
    launch("zero3", "ppo", tmp_path, f"policy={sft}", f"reward_model={tmp_path / 'rm'}", *lora)
    ppo = load_file(tmp_path / "ppo" / "model.safetensors")
    assert not torch.equal(ppo[f"{name}.weight"], merged[f"{name}.weight"]), "PPO changed nothing"

    # the RM with merged weights (configs/qwen2.5-0.5b/rm.yaml): base + (alpha / r) * B @ A and its
    # trained head; PPO then loads its reward and value models from them, straight into shards
    rm_merged = tmp_path / "rm-merged"
    launch("zero3", "rm", tmp_path, f"model={sft}", "loss.lm_coef=0", *lora, f"output_dir={rm_merged}")
    adapter = load_file(rm_merged / "adapter_model.safetensors")
    rm_weights = load_file(rm_merged / "merged" / "model.safetensors")
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(rm_weights[f"{name}.weight"], merged[f"{name}.weight"] + 2.0 * b @ a)
    assert "score.weight" in rm_weights
    launch(
        "zero3", "ppo", tmp_path, f"policy={sft}", f"reward_model={rm_merged}", *lora, f"output_dir={tmp_path / 'ppo2'}"
    )
    assert (tmp_path / "ppo2" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["plain", "main"])
def test_main_process_work_longer_than_the_group_timeout_does_not_abort_the_others(tmp_path, mode):
    """The main process works alone (as a held-out evaluation does) for longer than the process
    group's timeout: the others waiting in a plain barrier give up (what aborted a finished run),
    in `wait_for_main` they wait for it."""
    done = tmp_path / "ok"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / MODES["ddp"])]
    cmd += ["--num_processes", "2", "--main_process_port", str(_free_port())]
    cmd += [str(ROOT / "tests/main_only_wait.py"), mode, "6", str(done)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1", "RLHF_PG_TIMEOUT_S": "2"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if mode == "plain":
        assert result.returncode != 0 and "Timed out" in result.stderr and not done.exists()
    else:
        assert result.returncode == 0 and done.read_text() == "ok", result.stderr[-3000:]
