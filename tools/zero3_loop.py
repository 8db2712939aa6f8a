"""Two-process DeepSpeed ZeRO-3 runs of one stage, N times in a row, each in a fresh output
directory, and a count of their exit codes: the check that a stage ends cleanly every time under
ZeRO-3 (a rare abort in the process group's teardown, `terminate called without an active
exception`, once ended one run in a few).

    python -m tools.zero3_loop --stage sft --runs 20
    python -m tools.zero3_loop --stage ppo --runs 10 --log runs/zero3_loop.jsonl   # append, tally all
    python -m tools.zero3_loop --stage rm --runs 20 --budget-s 450 --log runs/zero3_loop.jsonl  # stop in time

Each run is the tiny config, a few steps (the settings of tests/test_distributed.py), on CPU over
gloo. RM and PPO start from a test-sized random policy and reward model saved once into the work
directory (no SFT needed). A run counts as failed when it exits non-zero, hangs past --timeout,
or prints `terminate called` or a traceback. With --log, one JSON line per run is appended and the
tally covers every run in the file for that stage (a long loop split over several commands).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf.config import ModelInit
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve

ROOT = Path(__file__).resolve().parents[1]

ZERO3 = "configs/accelerate/zero3.yaml"
SCRIPTS = {"sft": "launch/stage1_sft.py", "rm": "launch/stage2_rm.py", "ppo": "launch/stage3_ppo.py"}
QUIET = ["tracking.report_to=[]", "tracking.progress=false"]
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
        "loss.lm_coef=0",  # ZeRO-3 refuses the RM's LM loss
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


def make_inputs(work: Path) -> dict[str, Path]:
    """A test-sized random policy (causal LM) and reward model (scalar head) saved as Hugging Face
    directories: the inputs RM and PPO read, loaded as a user's SFT and RM outputs would be."""
    dirs = {"policy": work / "policy", "reward_model": work / "reward_model"}
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    for name, build in (("policy", build_policy), ("reward_model", build_scalar_model)):
        if not (dirs[name] / "config.json").is_file():
            build(source, ModelInit(), tokenizer, seed=0).save_pretrained(dirs[name])
            tokenizer.save_pretrained(dirs[name])
    return dirs


def one_run(stage: str, out: Path, inputs: dict[str, Path], port: int, timeout: float) -> dict:
    extra = {"sft": [], "rm": [f"model={inputs['policy']}"]}.get(stage)
    if extra is None:
        extra = [f"policy={inputs['policy']}", f"reward_model={inputs['reward_model']}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / ZERO3)]
    cmd += ["--num_processes", "2", "--main_process_port", str(port), str(ROOT / SCRIPTS[stage])]
    cmd += ["--config", str(ROOT / f"configs/tiny/{stage}.yaml"), *STAGE_ARGS[stage], *QUIET, *extra]
    cmd.append(f"output_dir={out}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    # a session of its own: a hung run's workers (children of the launcher) are killed with it
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        code = "timeout"
    run = {
        "stage": stage,
        "exit": code,
        "finished": (out / "manifest.json").is_file(),
        "terminate_called": "terminate called" in stderr,
        "traceback": "Traceback" in stderr,
        "wall_s": round(time.time() - started, 1),
    }
    run["stderr_tail"] = "" if ok(run) else stderr[-2000:]
    return run


def ok(run: dict) -> bool:
    return run["exit"] == 0 and run["finished"] and not run["terminate_called"] and not run["traceback"]


def tally(runs: list[dict]) -> dict:
    return {
        "runs": len(runs),
        "ok": sum(ok(r) for r in runs),
        "exit_codes": dict(collections.Counter(str(r["exit"]) for r in runs)),
        "terminate_called": sum(r["terminate_called"] for r in runs),
        "wall_s_total": round(sum(r["wall_s"] for r in runs), 1),
        "wall_s_per_run": round(sum(r["wall_s"] for r in runs) / max(len(runs), 1), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run counts as hung")
    parser.add_argument("--log", type=Path, help="append one JSON line per run here; tally every run in it")
    parser.add_argument(
        "--budget-s", type=float, help="start no run that would end past this many seconds (the longest run so far)"
    )
    parser.add_argument("--work", type=Path, help="where the inputs and outputs go (default: a temporary directory)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="zero3_loop_"))
    inputs = make_inputs(work)
    runs, started = [], time.time()
    for i in range(args.runs):
        longest = max((r["wall_s"] for r in runs), default=0)
        if args.budget_s and time.time() - started + longest > args.budget_s:
            print(f"stopping after {i} runs: the next could overrun --budget-s {args.budget_s:.0f}", flush=True)
            break
        out = Path(tempfile.mkdtemp(prefix=f"{args.stage}-", dir=work))  # fresh each time
        run = one_run(args.stage, out, inputs, 29500 + (os.getpid() + i) % 500, args.timeout)
        runs.append(run)
        print(f"{args.stage} run {i + 1}/{args.runs}: exit {run['exit']} in {run['wall_s']} s", flush=True)
        if ok(run):
            shutil.rmtree(out, ignore_errors=True)
        else:  # kept for a look
            print(f"{out}:\n{run['stderr_tail']}", file=sys.stderr, flush=True)
        if args.log:
            args.log.parent.mkdir(parents=True, exist_ok=True)
            with open(args.log, "a") as f:
                f.write(json.dumps(run) + "\n")
    print(json.dumps({"stage": args.stage, "this_invocation": tally(runs)}))
    if args.log:
        logged = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
        print(json.dumps({"stage": args.stage, "all_logged": tally([r for r in logged if r["stage"] == args.stage])}))
    return 0 if all(ok(r) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
