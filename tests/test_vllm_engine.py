"""The vLLM rollout engine is the same policy as the trainer's: greedy responses equal the HF
engine's on the same weights, the log-probs it reports for sampled tokens equal a trainer forward
(fp32), and after a PPO update the engine samples from the updated policy (weights synced in
place), with and without LoRA. Real vLLM (the CPU build: `make vllm`), no mock; skipped where it is
not installed."""

import pytest
import torch
from accelerate import Accelerator

from conftest import ROOT
from rlhf.config import GenerationConfig, ModelInit, PPOStageConfig, load_config
from rlhf.generation import ended_at, render_prompts
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve, stop_token_ids
from stages.ppo.core_algos import logprobs_from_logits
from stages.ppo.engines import HFEngine, resolve_engine
from stages.ppo.models import PolicyAndValue, build_models, policy_logits
from stages.ppo.rollout import response_mask
from stages.ppo.vllm_engine import VLLMEngine, vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (its own environment: make vllm)"),
]

FP32 = ModelInit(mixed_precision=None, dtype="float32")
# fp32 log-probs of the same weights through vLLM's kernels and transformers' forward: measured
# max |Δ| ≈ 1e-6 on the tiny policy; 1e-4 leaves room for other CPUs' summation orders while a
# wrong temperature, a stale weight or a shifted position is off by ≥ 1e-2
LOGPROB_TOL = 1e-4
QUESTIONS = [f"{a} - {b} = ?" for a, b in [(5, 3), (12, 7), (40, 11), (9, 9), (73, 28), (100, 1), (3, 8), (58, 20)]]


def forward_logprobs(policy, prompt_ids, response_ids, tokenizer, temperature):
    """(B, R) log-probs of the responses under softmax(logits / T) from one trainer forward, and
    the response mask (1 up to and including the first stop token), as PPO builds them
    (stages/ppo/sampling.py `episode_tensors`): a response may hold the pad id as a sampled token,
    which counts and is attended to like any other (a random policy samples it)."""
    _, lengths = ended_at(response_ids, stop_token_ids(tokenizer, policy.generation_config))
    mask = response_mask(lengths, response_ids.shape[1])
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([(prompt_ids != tokenizer.pad_token_id).long(), mask], dim=1)  # left pads only
    with torch.no_grad():
        logits = policy_logits(policy, input_ids, attention, response_ids.shape[1])
    return logprobs_from_logits(logits.float() / temperature, response_ids), mask.bool()


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama policy in fp32 (the built-in default's shape: vLLM's CPU attention
    needs a head size of 32 or more), its tokenizer and prompts."""
    source = resolve("tiny")
    tokenizer = load_tokenizer(source, FP32)
    policy = build_policy(source, FP32, tokenizer, seed=0)
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])
    return policy, tokenizer, prompts


@pytest.fixture(scope="module")
def engines(tiny):
    policy, tokenizer, _ = tiny
    accelerator = Accelerator(cpu=True)
    model = PolicyAndValue(policy, None)
    precision = resolve_precision(FP32)
    engine = VLLMEngine(model, tokenizer, accelerator, precision)
    yield HFEngine(model, tokenizer, accelerator), engine, model
    engine.close()


def test_greedy_responses_equal_the_hf_engines(tiny, engines):
    _, _, prompts = tiny
    hf, vllm, _ = engines
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False)
    a, b = hf.generate(prompts, greedy, False), vllm.generate(prompts, greedy, False)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    assert a.response_ids.shape == b.response_ids.shape == (len(prompts), 12)
    assert torch.equal(a.response_ids, b.response_ids), (a.response_ids, b.response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_trainer_forward(tiny, engines, temperature):
    """vLLM's log-probs of its own sampled tokens are under softmax(logits / T), the distribution
    the trainer's ratio uses: a forward over prompt + response gives the same, within LOGPROB_TOL."""
    policy, tokenizer, prompts = tiny
    _, vllm, _ = engines
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=temperature)
    out = vllm.generate(prompts * 4, gen, True)
    expected, mask = forward_logprobs(policy, out.prompt_ids, out.response_ids, tokenizer, temperature)
    diff = (out.logprobs - expected).abs()[mask]
    assert mask.sum() > 100 and diff.max() < LOGPROB_TOL, diff.max()
    # the same tokens at another temperature are another distribution: the check can fail
    other, _ = forward_logprobs(policy, out.prompt_ids, out.response_ids, tokenizer, temperature + 0.5)
    assert (out.logprobs - other).abs()[mask].max() > 100 * LOGPROB_TOL


def test_auto_picks_hf_on_a_cpu():
    assert resolve_engine("auto", resolve_precision(FP32)) == "hf"
    assert resolve_engine("vllm", resolve_precision(FP32)) == "vllm"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_a_ppo_update_greedy_responses_and_logprobs_are_the_updated_policys(tmp_path, lora):
    """One real PPO step (rollout by vLLM, update by the trainer, `update_weights`): the engine's
    greedy responses and a probe log-prob equal the updated policy's, and the probe moved (the
    check would catch weights left stale)."""
    from stages.ppo import train as ppo_train
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.core_algos import KLController, RunningMoments
    from stages.ppo.prompts import load_prompts
    from stages.ppo.run import PPORun

    overrides = [
        "policy=tiny",
        "reward_model=null",
        "reward.sources.rm=null",
        "reward.sources.subtraction={kind: rule}",
    ]
    overrides += ["model_init.mixed_precision=null", "rollout.engine=vllm", "rollout.prompts_per_step=16"]
    overrides += ["ppo.minibatches=2", "ppo.value_warmup_steps=0", "optim.lr=3e-2", "task.train_size=64"]
    overrides += ["rollout.generation.max_new_tokens=6", f"output_dir={tmp_path}", "reward.missing_eos_penalty=null"]
    overrides += ["lora.enabled=true", "lora.r=8"] if lora else []
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)
    accelerator = Accelerator(cpu=True)
    precision = resolve_precision(cfg.model_init)
    models = build_models(cfg, accelerator, ESTIMATORS[cfg.ppo.advantage_estimator], precision)
    data = load_prompts(cfg, models.tokenizer)
    engine = VLLMEngine(models.model, models.tokenizer, accelerator, precision)
    hf = HFEngine(models.model, models.tokenizer, accelerator)
    policy = models.model.policy
    probe_prompts = data.prompt_ids[:8]
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True)

    before = engine.generate(probe_prompts, sampled, True)
    run = PPORun(
        cfg=cfg,
        accelerator=accelerator,
        models=models,
        engine=engine,
        data=data,
        kl_ctl=KLController(0.0, None, 1),
        running=RunningMoments(),
    )
    rollout, *_ = ppo_train.make_rollout(run, list(range(16)), 0)
    ppo_train.ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, 0)
    engine.update_weights(models.model)

    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)
    assert torch.equal(
        engine.generate(probe_prompts, greedy, False).response_ids,
        hf.generate(probe_prompts, greedy, False).response_ids,
    )
    now, mask = forward_logprobs(policy, before.prompt_ids, before.response_ids, models.tokenizer, 1.0)
    probe = engine.generate(probe_prompts, sampled, True)
    expected, probe_mask = forward_logprobs(policy, probe.prompt_ids, probe.response_ids, models.tokenizer, 1.0)
    assert (probe.logprobs - expected).abs()[probe_mask].max() < LOGPROB_TOL
    assert (now - before.logprobs).abs()[mask].max() > 100 * LOGPROB_TOL  # the update moved the policy
    engine.close()
