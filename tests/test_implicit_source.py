"""The `implicit` reward source: a DPO model's implicit reward beta · Σ (log π_DPO − log π_ref) of the
sampled tokens, against one unpadded forward per episode worked out here; the reference's log-probs
from step 2 give the same reward as the source's own reference forward; configs and reward models
of the wrong kind are refused; the pipeline wires a DPO stage's output to PPO, and the default
pipeline command runs SFT -> DPO -> PPO end to end."""

import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from conftest import ROOT, run_entry
from rlhf.config import ConfigError, ModelInit, PPOStageConfig, load_config
from rlhf.pipeline import jobs, load_pipeline, resolved_stage_config
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.tracking import read_metrics
from stages.ppo.models import PolicyAndValue, _check_reward_model_kind, reference_logprobs
from stages.ppo.rewards import Episodes, SourceContext, build_sources, implicit_rewards

IMPLICIT = ROOT / "configs/tiny/ppo_implicit.yaml"


def test_implicit_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.25, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # 0.1 · ((−1 + 1.5) + (−2 + 1)) = −0.05 (the padded third token left out); 0.1 · (0.5 + 0.75 − 2) = −0.075
    assert torch.allclose(implicit_rewards(logprobs, ref, mask, 0.1), torch.tensor([-0.05, -0.075]))


@pytest.fixture(scope="module")
def models():
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    reference = build_policy(source, ModelInit(), tokenizer, seed=0).eval()
    dpo = build_policy(source, ModelInit(), tokenizer, seed=1).eval()  # other weights, the same tokenizer
    return tokenizer, reference, dpo


def _episodes(tokenizer):
    """Two episodes as step 1 leaves them: prompts left-padded, responses right-padded after their stop token."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, eos], [12, eos]]
    P, R = 3, 3
    ids = torch.tensor(
        [[pad] * (P - len(p)) + p + r + [pad] * (R - len(r)) for p, r in zip(prompts, responses, strict=True)]
    )
    mask = torch.tensor(
        [
            [0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    return prompts, responses, ids, mask


def _by_hand(model, prompts, responses) -> list[float]:
    """Σ log p(response token) in one unpadded forward of each episode."""
    totals = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float()
            totals.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum().item())
    return totals


def test_the_source_scores_the_sampled_tokens_against_the_reference(models):
    tokenizer, reference, dpo = models
    prompts, responses, ids, mask = _episodes(tokenizer)
    cfg = load_config(PPOStageConfig, IMPLICIT, ["reward.sources.dpo.beta=0.5"])
    accelerator = Accelerator(cpu=True)
    ctx = SourceContext(accelerator=accelerator, implicit_model=dpo, forward_batch_size=1)
    ctx.reference_logprobs = lambda i, m, r: reference_logprobs(PolicyAndValue(reference, None), reference, i, m, r)
    source = build_sources(cfg.reward, ctx)["dpo"]
    chats = [[{"role": "user", "content": "q"}]] * 2
    episodes = Episodes(
        prompts=chats, responses=["", ""], fields={}, input_ids=ids, attention_mask=mask,
        response_ids=ids[:, -3:], response_mask=mask[:, -3:],
    )  # fmt: skip
    dpo_sums, reference_sums = _by_hand(dpo, prompts, responses), _by_hand(reference, prompts, responses)
    expected = [0.5 * (d - r) for d, r in zip(dpo_sums, reference_sums, strict=True)]
    own_reference = source(episodes)  # no step-2 log-probs (as dynamic sampling scores): its own reference forward
    assert torch.allclose(own_reference, torch.tensor(expected), atol=1e-5), (own_reference, expected)
    assert all(abs(e) > 1e-3 for e in expected)  # two different models: a reward that is not zero by accident
    step_2 = reference_logprobs(PolicyAndValue(reference, None), reference, ids, mask, ids[:, -3:])
    episodes.ref_logprobs = step_2
    assert torch.allclose(source(episodes), own_reference, atol=1e-6)
    ctx.implicit_model = reference  # the reference against itself: no preference, no reward
    assert torch.allclose(source(episodes), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["reward.sources.rm={kind: model}"], "not both"),
        (["reward_model=null"], "is null but reward.sources.dpo"),
        (["train.keep_best=proxy"], "null or read as implicit"),
        (["reward.sources.dpo.beta=0"], "must be > 0"),
    ],
)
def test_configs_the_implicit_reward_cannot_serve_are_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(PPOStageConfig, IMPLICIT, overrides)


def _stage_output(path, stage: str, init_from: str):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "init_from": init_from}))
    return path


def test_a_reward_model_of_the_wrong_kind_is_refused(tmp_path, caplog):
    sft = str(tmp_path / "sft")
    dpo, rm = _stage_output(tmp_path / "dpo", "dpo", sft), _stage_output(tmp_path / "rm", "rm", sft)
    scalar = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [f"policy={sft}", f"reward_model={dpo}"])
    with pytest.raises(ConfigError, match="no scalar head; read it as a DPO model's implicit reward"):
        _check_reward_model_kind(scalar)  # a DPO model's LM read through a random scalar head: refused
    implicit = load_config(PPOStageConfig, IMPLICIT, [f"policy={sft}", f"reward_model={rm}"])
    with pytest.raises(ConfigError, match="is a reward model with a scalar head: use kind model"):
        _check_reward_model_kind(implicit)
    with caplog.at_level(logging.WARNING, logger="rlhf.ppo"):
        _check_reward_model_kind(load_config(PPOStageConfig, IMPLICIT, [f"policy={sft}", f"reward_model={dpo}"]))
        assert not caplog.records  # PPO's reference is the model DPO started from
        other = load_config(PPOStageConfig, IMPLICIT, ["policy=tiny-llama", f"reward_model={dpo}"])
        _check_reward_model_kind(other)
    assert "only against the model DPO started from" in caplog.text


def test_the_pipeline_gives_ppo_the_dpo_output_where_there_is_no_rm(tmp_path):
    pipeline = str(ROOT / "configs/tiny/pipeline.yaml")  # the default
    cfg = load_pipeline(pipeline, [f"runs_dir={tmp_path}"])
    configs = {j.name: resolved_stage_config(cfg, j) for j in jobs(cfg)}
    run = tmp_path / "tiny"
    assert list(configs) == ["sft", "dpo", "ppo"]
    assert (configs["ppo"].policy, configs["ppo"].reward_model) == (str(run / "sft"), str(run / "dpo"))
    assert configs["dpo"].policy == str(run / "sft") and configs["dpo"].model_init.mixed_precision is None
    assert configs["ppo"].ppo.kl_coef == configs["ppo"].reward.sources["dpo"].beta == configs["dpo"].loss.beta
    with pytest.raises(ConfigError, match="ppo reads the output of rm or dpo, which must come before it"):
        load_pipeline(pipeline, ["stages=[sft, ppo]"])


def _saved(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_ppo_runs_on_a_dpo_models_implicit_reward(models, tmp_path):
    tokenizer, reference, dpo_model = models
    sft, dpo = _saved(tmp_path / "sft", reference, tokenizer), _saved(tmp_path / "dpo", dpo_model, tokenizer)
    out = tmp_path / "ppo"
    fast = ["task.train_size=64", "task.eval_size=8", "task.test_per_bucket=4", "rollout.prompts_per_step=8"]
    fast += ["ppo.minibatches=2", "rollout.generation.max_new_tokens=4", "generation.max_new_tokens=4"]
    fast += ["tracking.report_to=[]", "tracking.progress=false", "train.eval_every=0", "ppo.value_warmup_steps=0"]
    result = run_entry(
        "launch/stage3_ppo.py",
        "--config",
        str(IMPLICIT),
        f"policy={sft}",
        f"reward_model={dpo}",
        *fast,
        "train.max_steps=2",
        "train.save_every=0",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = [r["train/reward/dpo"] for r in read_metrics(out / "metrics.jsonl") if "train/reward/dpo" in r]
    assert len(rewards) == 2 and all(r != 0 for r in rewards)  # two different models: a non-zero reward
    evaluation = json.loads((out / "eval.json").read_text())
    assert "rm_score" not in json.dumps(evaluation)  # no scalar reward model to score the answers


@pytest.mark.slow
def test_the_default_pipeline_command_runs_sft_then_dpo_then_ppo_on_the_implicit_reward(tmp_path):
    """`python launch/pipeline.py` with no --config (what `make pipeline` runs), cut to a few steps a
    stage: the DPO output is PPO's reward model, every stage finishes, the summary has a DPO row."""
    small = ["model=tiny-llama", "sft.evaluate_base=false", "sft.train.max_steps=2", "sft.train.batch_size=8"]
    small += ["sft.task.train_size=64", "dpo.pairs.train_size=64", "dpo.pairs.eval_size=8", "dpo.train.max_steps=2"]
    small += ["dpo.pairs.onpolicy_fraction=0", "dpo.train.batch_size=8", "ppo.task.train_size=32"]
    small += ["ppo.rollout.prompts_per_step=8", "ppo.ppo.minibatches=2", "ppo.rollout.generation.max_new_tokens=4"]
    small += ["ppo.generation.max_new_tokens=4", "ppo.train.max_steps=2", "ppo.train.eval_every=0"]
    for stage in ("sft", "dpo", "ppo"):
        small += [f"{stage}.task.eval_size=8", f"{stage}.task.test_per_bucket=4", f"{stage}.tracking.report_to=[]"]
        small += [f"{stage}.tracking.progress=false"]
    cmd = [sys.executable, str(ROOT / "launch/pipeline.py"), f"runs_dir={tmp_path}", "report=false", *small]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "tiny"  # the default file's name
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in ("sft", "dpo", "ppo")}
    assert [m["stage"] for m in manifests.values()] == ["sft", "dpo", "ppo"] and not (run / "rm").exists()
    assert str(run / "dpo") in manifests["ppo"]["inputs"]  # PPO's reward model is the DPO output
    rewards = [r["train/reward/dpo"] for r in read_metrics(run / "ppo" / "metrics.jsonl") if "train/reward/dpo" in r]
    assert len(rewards) == 2
    assert re.search(r"^\s*dpo\s+held-out pair accuracy", result.stdout, re.MULTILINE), result.stdout[-3000:]
