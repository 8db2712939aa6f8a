"""Proxy against gold (issue 16; Gao et al. 2022): the points read from a PPO run's metrics, the
over-optimisation warning's rule, train.keep_best's choice of output policy, and a real PPO run
whose report carries the proxy-vs-gold plot."""

import json

import pytest
from test_ppo_stage import FAST

from conftest import ROOT, run_entry
from rlhf.config import ConfigError, ModelInit, PPOStageConfig, load_config
from rlhf.pipeline import summary_table
from rlhf.proxy_gold import Point, best_gold, divergence, points_from_records
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.report import write_report
from rlhf.tracking import read_metrics
from stages.ppo.run import LoopState
from stages.ppo.saving import restore_best


def _save_policy(out):
    """A test-sized random policy saved as an SFT output would be."""
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _points(*rows):
    return [Point(step=s, kl=k, proxy=p, gold=g) for s, k, p, g in rows]


def test_points_read_evaluations_with_the_mean_kl_of_the_steps_before():
    records = [{"step": s, "train/ppo/kl": float(s)} for s in range(1, 13)]
    records += [
        {"step": 4, "eval/ppo/gold_accuracy": 0.80, "eval/ppo/rm_score": 1.0},
        {"step": 12, "eval/ppo/gold_accuracy": 0.90, "eval/ppo/rm_score": 2.0},
    ]
    points = points_from_records(records, before={"accuracy": 0.70, "rm_score": 0.5})
    # step 4: mean KL of steps 1-4 = 2.5; step 12: of the last ten, steps 3-12 = 7.5
    assert points == _points((0, 0.0, 0.5, 0.70), (4, 2.5, 1.0, 0.80), (12, 7.5, 2.0, 0.90))
    # eval.json quoting the test split: the starting point is its validation block, the split the
    # in-loop evaluations use (the test figure would put one point on another set of items)
    before = {"split": "test", "accuracy": 0.78, "rm_score": 3.0, "validation": {"accuracy": 0.70, "rm_score": 0.5}}
    assert points_from_records(records, before=before)[0] == _points((0, 0.0, 0.5, 0.70))[0]


def test_warning_when_proxy_rises_after_gold_peaked_and_fell():
    diverged = _points((0, 0.0, 1.0, 0.80), (100, 1.0, 2.0, 0.90), (200, 3.0, 2.5, 0.85), (300, 6.0, 3.0, 0.80))
    assert best_gold(diverged).step == 100
    warning = divergence(diverged)
    assert warning is not None and "2.000 -> 3.000" in warning and "0.900 -> 0.800" in warning
    # gold fell, but so did the proxy: the reward model agrees, nothing is being exploited
    assert divergence(_points((0, 0.0, 1.0, 0.80), (100, 1.0, 2.0, 0.90), (200, 2.0, 1.5, 0.80))) is None
    # the proxy rose and gold fell by 0.015, within the 0.02 evaluation noise allowed
    assert divergence(_points((0, 0.0, 1.0, 0.80), (100, 1.0, 2.0, 0.90), (200, 2.0, 2.5, 0.885))) is None
    # gold still at its best at the end
    assert divergence(_points((0, 0.0, 1.0, 0.80), (100, 1.0, 2.0, 0.85), (200, 2.0, 2.5, 0.90))) is None
    # equal gold: the earliest is the best, and no fall follows it
    assert best_gold(_points((0, 0.0, 1.0, 0.9), (100, 1.0, 2.0, 0.9))).step == 0


def _kept_dir(tmp_path):
    out = tmp_path / "ppo"
    (out / "best").mkdir(parents=True)
    (out / "model.safetensors").write_text("last step")
    (out / "best" / "model.safetensors").write_text("step 200")
    return out


def test_keep_best_replaces_the_last_policy_when_an_earlier_one_was_better(tmp_path):
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["train.keep_best=gold"])
    state = LoopState(step=1000, best={"by": "gold", "step": 200, "value": 0.90})
    out = _kept_dir(tmp_path / "a")
    kept = restore_best(cfg, state, {"accuracy": 0.85}, out)
    assert kept == {"by": "gold", "step": 200, "value": 0.90, "last_step": 1000, "last_step_value": 0.85}
    assert (out / "model.safetensors").read_text() == "step 200"
    # out/best stays until the manifest is written: a kill before it, then a rerun from the final
    # checkpoint (which saves the last step's policy again), keeps the same policy
    (out / "model.safetensors").write_text("last step")
    assert restore_best(cfg, state, {"accuracy": 0.85}, out) == kept
    assert (out / "model.safetensors").read_text() == "step 200"
    # the last step at least as good: it stays
    out = _kept_dir(tmp_path / "b")
    assert restore_best(cfg, state, {"accuracy": 0.90}, out) is None
    assert (out / "model.safetensors").read_text() == "last step"
    # by the proxy: the reward model's score decides
    proxy = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["train.keep_best=proxy"])
    out = _kept_dir(tmp_path / "c")
    state = LoopState(step=1000, best={"by": "proxy", "step": 200, "value": 2.0})
    assert restore_best(proxy, state, {"accuracy": 0.1, "rm_score": 2.5}, out) is None
    assert (out / "model.safetensors").read_text() == "last step"


def test_keep_best_is_refused_without_evaluations_or_without_a_proxy():
    tiny = ROOT / "configs/tiny/ppo.yaml"
    with pytest.raises(ConfigError, match=r"train\.eval_every"):
        load_config(PPOStageConfig, tiny, ["train.keep_best=gold", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="reward_model is null"):
        load_config(PPOStageConfig, tiny, ["train.keep_best=proxy", "reward_model=null", "reward.sources.rm=null"])


@pytest.mark.slow
def test_ppo_run_logs_gold_keeps_best_and_reports_proxy_vs_gold(tmp_path):
    """A real (test-sized) run: gold on every step and at every evaluation, the evaluation with the
    best proxy kept, and the report's proxy-vs-gold plot and the summary's lines written."""
    out = tmp_path / "run" / "ppo"
    policy = tmp_path / "policy"
    _save_policy(policy)
    args = [a for a in FAST if not a.startswith("train.eval_every")]
    result = run_entry(
        "launch/stage3_ppo.py",
        f"policy={policy}",
        "reward_model=tiny-llama",
        *args,
        "train.max_steps=6",
        "train.eval_every=2",
        "train.save_every=0",
        "train.keep_best=proxy",
        f"output_dir={out}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "train/ppo/gold" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "eval/ppo/gold_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    proxy = {r["step"]: r["eval/ppo/rm_score"] for r in evals}
    report = json.loads((out / "eval.json").read_text())
    in_loop = {s: round(v, 4) for s, v in proxy.items() if s < 6}  # compared at eval.json's 4 places
    best_step = max(in_loop, key=lambda s: (in_loop[s], -s))
    if in_loop[best_step] > proxy[6]:
        assert report["kept"]["step"] == best_step and report["kept"]["value"] == in_loop[best_step]
    else:
        assert "kept" not in report
    assert not (out / "best").exists()
    write_report(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "plots" / "data.json").read_text())
    assert data["ppo_proxy_gold"]["step"] == [0, 2, 4, 6]
    assert "best gold (step, KL)" in summary_table(tmp_path / "run", ("ppo",))
