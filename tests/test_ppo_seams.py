"""The seams stage 3 grows on: rollout engines and advantage estimators are registries chosen by
config, an estimator without a critic means no value model anywhere, and a Rollout cannot be
built from positional tensors."""

import copy

import pytest
import torch
from accelerate import Accelerator
from test_ppo_stage import FAST, sft_dir  # noqa: F401  (the module-scoped policy fixture)

from conftest import ROOT
from rlhf.config import ConfigError, LoraConfig, ModelInit, PPOStageConfig, load_config
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.tracking import read_metrics
from stages.ppo import advantages, engines
from stages.ppo import train as ppo_train
from stages.ppo.rollout import Rollout
from stages.ppo.vllm_engine import policy_weights


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


@pytest.mark.slow
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


def test_weights_an_engine_receives_are_the_policys_with_the_adapter_merged():
    """What `update_weights` sends a vLLM engine (no vLLM needed to check): every parameter under
    its plain Hugging Face name (a tied head once), and with LoRA W + B·A·scale of the current
    adapter, equal to PEFT's own merge, the base weights untouched."""
    init = ModelInit(mixed_precision=None, dtype="float32")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, init)
    accelerator = Accelerator(cpu=True)
    plain = build_policy(source, init, tokenizer, seed=0)
    sent = dict(policy_weights(plain, accelerator))
    assert sorted(sent) == sorted(n for n, _ in plain.named_parameters())
    assert all(torch.equal(sent[n], p) for n, p in plain.named_parameters())

    lora = build_policy(source, init, tokenizer, LoraConfig(enabled=True, r=4), seed=0, trained=True)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: make the adapter change something
    sent = dict(policy_weights(lora, accelerator))
    merged = dict(copy.deepcopy(lora).merge_and_unload().named_parameters())
    assert sorted(sent) == sorted(merged)
    assert all(torch.allclose(sent[n], merged[n], atol=1e-6) for n in sent)
    base = dict(plain.named_parameters())
    # 2 layers × the 7 LoRA targets of a Llama changed, nothing else; the adapter's own base weights untouched
    assert sum(not torch.equal(sent[n], base[n]) for n in sent) == 2 * 7
    assert torch.equal(
        lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
        base["model.layers.0.self_attn.q_proj.weight"],
    )
