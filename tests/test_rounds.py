"""Iterated RLHF rounds (issue 16, seed 002) through the real pipeline on test-sized models: round 2
labels round 1's policy's samples, continues round 1's reward model and runs PPO from round 1's
policy (checked by weight fingerprints in the manifests), and a round killed with kill -9 in its
PPO stage is finished by the same command, the stages already done skipped."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from test_pipeline import SMALLEST

from conftest import ROOT, run_entry, tiny_config
from rlhf.cli import parse
from rlhf.config import ModelInit
from rlhf.pipeline import KINDS
from rlhf.registry import build_policy, build_scalar_model, fingerprint, load_tokenizer, resolve

# slow: every test runs the pipeline command over RLHF rounds
pytestmark = pytest.mark.slow

ROUNDS = [
    *SMALLEST,
    "report=true",
    "rounds=2",
    "round.reference=previous",  # the reference is the policy round 2 starts from: its fingerprint is checked
    "round.ppo_overrides=[train.max_steps=12, train.save_every=2]",
    "label.prompts=16",
    "label.eval_prompts=8",
    "label.task.train_size=64",
    "label.task.eval_size=8",  # the held-out splits of SMALLEST's stages (the pipeline checks every round's)
    "label.task.test_per_bucket=4",
    "label.generation.max_new_tokens=4",
    # an untrained policy's answers are all wrong, so the rule would tie them all: a function labels
    "label.labeller.name=function",
    "label.labeller.function=test_labellers:prefer_shorter",
]
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
}


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_round_two_continues_round_one_and_a_killed_round_resumes(tmp_path):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "r"
    args = [f"runs_dir={runs}", "name=r", *ROUNDS]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/pipeline.py"), *tiny_config("launch/pipeline.py", ()), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=ENV,
    )
    marker = run / "round-2" / "ppo" / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 900
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "pipeline ended before round 2's first PPO checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline, accelerate and the stage, all at once
    proc.wait()
    assert not (run / "round-2" / "ppo" / "manifest.json").exists()

    again = run_entry("launch/pipeline.py", *args, timeout=900, env=ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for done in ("sft", "rm", "ppo", "round-2/label", "round-2/rm"):
        assert f"{done}: finished output" in again.stdout, done
    assert re.search(r"resumed from .*step-\d+", (run / "logs" / "round-2-ppo.log").read_text())
    assert _manifest(run / "round-2" / "ppo")["metrics"]["steps"] == 12

    # round 2 sampled round 1's policy, continued round 1's RM and started PPO from round 1's policy
    assert _manifest(run / "round-2" / "label")["model"] == str(run / "ppo")
    rm_source = resolve(str(run / "rm"))
    rm = build_scalar_model(rm_source, ModelInit(), load_tokenizer(rm_source, ModelInit()))
    assert _manifest(run / "round-2" / "rm")["metrics"]["init_fingerprint"] == fingerprint(rm)
    policy_source = resolve(str(run / "ppo"))
    policy = build_policy(policy_source, ModelInit(), load_tokenizer(policy_source, ModelInit()))
    ppo2 = _manifest(run / "round-2" / "ppo")
    assert ppo2["model"] == str(run / "ppo")
    assert ppo2["metrics"]["reference_fingerprint"] == fingerprint(policy.requires_grad_(False), frozen_only=True)
    # the round's comparisons reached the RM: its held-out pairs of kind round-2 are evaluated
    label = json.loads((run / "round-2" / "label" / "eval.json").read_text())
    rm_eval = json.loads((run / "round-2" / "rm" / "eval.json").read_text())
    assert label["eval"]["pairs"] == rm_eval["n_by_kind"]["round-2"] > 0
    assert "round-2/rm" in again.stdout and "accuracy on the policy's samples" in again.stdout
    data = json.loads((run / "plots" / "data.json").read_text())
    assert "ppo_proxy_gold" in data and "ppo_proxy_gold_round-2" in data


def test_round_stages_are_wired_to_the_round_before(tmp_path):
    result = run_entry("launch/pipeline.py", f"runs_dir={tmp_path}", "name=w", "rounds=3", "--dry-run")
    assert result.returncode == 0, result.stderr
    run, configs = tmp_path / "w", {}
    for line in result.stdout.splitlines():
        name, _, command = line.removeprefix("[pipeline] ").partition(": ")
        args = shlex.split(command)  # the command as printed is the command run
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        configs[name] = parse(KINDS[name.split("/")[-1]].config_class, None, args[script + 1 :])[0]
    assert list(configs) == ["sft", "rm", "ppo", *(f"round-{k}/{s}" for k in (2, 3) for s in ("label", "rm", "ppo"))]
    r2, r3 = run / "round-2", run / "round-3"
    assert (configs["round-2/label"].policy, configs["round-2/label"].reward_model) == (
        str(run / "ppo"),
        str(run / "rm"),
    )
    assert configs["round-2/label"].round == 2 and configs["round-3/label"].policy == str(r2 / "ppo")
    assert configs["round-3/rm"].model == str(r2 / "rm") and configs["round-3/rm"].pairs.onpolicy_fraction == 0
    # the RM's data grows: every round's comparisons so far; its held-out pairs are this round's
    assert configs["round-3/rm"].pairs.extra_train == (str(r2 / "label/pairs.jsonl"), str(r3 / "label/pairs.jsonl"))
    assert configs["round-3/rm"].pairs.extra_eval == (str(r3 / "label/eval_pairs.jsonl"),)
    # configs/tiny/pipeline_rm.yaml's round.rm_overrides: a continuation, each comparison 13 times
    assert configs["round-3/rm"].train.max_steps == 1500 and configs["round-3/rm"].pairs.extra_train_repeat == 13
    ppo3 = configs["round-3/ppo"]
    assert (ppo3.policy, ppo3.reward_model, ppo3.reference) == (str(r2 / "ppo"), str(r3 / "rm"), str(run / "sft"))
    assert ppo3.output_dir == str(r3 / "ppo") and ppo3.tracking.run_name == "w-round-3-ppo"
