"""The seams stage 3 grows on: rollout engines and advantage estimators are registries chosen by
config, an estimator without a critic means no value model anywhere, and a Rollout cannot be
built from positional tensors."""

import pytest
import torch
from test_ppo_stage import FAST, sft_dir  # noqa: F401  (the module-scoped policy fixture)

from conftest import ROOT
from rlhf.config import ConfigError, PPOStageConfig, load_config
from rlhf.tracking import read_metrics
from stages.ppo import advantages, engines
from stages.ppo import train as ppo_train
from stages.ppo.rollout import Rollout


def reward_to_go(rewards, values, mask, *, gamma, lam, group_size):
    """A critic-free estimator for the test: A_t = Σ_{k≥t} r_k (REINFORCE), no returns."""
    advantages_ = rewards.float().flip(1).cumsum(1).flip(1) * mask
    return advantages_, advantages_


def test_rollout_is_built_by_keyword_only():
    t = torch.zeros(2, 3)
    with pytest.raises(TypeError):
        Rollout(t, t, t, t, t, t, t, t, t, t[:, 0], t, t, t)  # eleven-plus positional tensors: refused
    r = Rollout(
        input_ids=t,
        attention_mask=t,
        response_ids=t,
        response_mask=t,
        loss_mask=t,
        logprobs=t + 1,
        ref_logprobs=t + 2,
        values=None,
        kl=t,
        scores=t[:, 0],
        rewards=t,
        advantages=t,
        returns=None,
    )
    picked = r.select(torch.tensor([1]))
    assert picked.logprobs.shape == (1, 3) and picked.values is None and picked.ref_logprobs[0, 0] == 2


def test_unknown_engine_or_estimator_is_refused_before_any_model_loads(tmp_path):
    for key in ("rollout.engine=nope", "ppo.advantage_estimator=nope"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):  # the engine's names are typed: refused on load
            cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [key, f"output_dir={tmp_path / 'x'}"])
            ppo_train.train(cfg)
        assert not (tmp_path / "x").exists()


def test_an_estimator_without_a_critic_builds_no_value_model(sft_dir, tmp_path, monkeypatch):  # noqa: F811
    """A registered estimator that needs no critic: no value model is built, trained or saved,
    and the policy still trains (its loss and KL are logged, no value terms)."""
    monkeypatch.setitem(advantages.ESTIMATORS, "reward_to_go", advantages.Estimator(reward_to_go, needs_critic=False))
    built = []
    real_build = ppo_train.build_models

    def build_models(*args, **kwargs):
        models = real_build(*args, **kwargs)
        unwrapped = models.model.module if hasattr(models.model, "module") else models.model
        built.append(unwrapped.value_model)
        built.append(len(models.optimizer.param_groups))
        return models

    monkeypatch.setattr(ppo_train, "build_models", build_models)
    out = tmp_path / "ppo"
    overrides = [f"policy={sft_dir}", "reward_model=null", "reward.model_weight=0", "reward.rules={subtraction: 1.0}"]
    overrides += [*FAST, f"output_dir={out}", "train.max_steps=2", "train.save_every=0"]
    overrides += ["ppo.advantage_estimator=reward_to_go"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    assert built == [None, 1]  # no value model, one parameter group (the policy's)
    assert not (out / "value_model").exists() and not (out / "value_head.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/policy_loss" in r]
    assert len(rows) == 2 and all("train/ppo/value_loss" not in r for r in rows)


def test_engines_registry_holds_the_hf_sampler_and_vllm():
    assert engines.ENGINES["hf"] is engines.HFEngine
    assert set(engines.ENGINES) == {"hf", "vllm"}  # `auto` is not an engine: resolve_engine picks one of these
