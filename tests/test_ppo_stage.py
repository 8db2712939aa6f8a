"""Stage 3 end to end through its real entry point on test-sized models: the policy changes and
the reference does not, rule-only and reward-model-only runs work, a NaN stops the run before the
weights, and an interrupted run resumes to the same result as an uninterrupted one."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_entry, tiny_config
from rlhf.config import ModelInit
from rlhf.registry import build_policy, build_scalar_model, fingerprint, load_tokenizer, resolve, score_head
from rlhf.tracking import read_metrics
from stages.ppo.vllm_engine import vllm_available

FAST = [
    "task.train_size=256",
    "task.eval_size=16",
    "task.test_per_bucket=8",
    "rollout.prompts_per_step=16",
    "ppo.minibatches=2",
    "rollout.generation.max_new_tokens=6",
    "generation.max_new_tokens=6",
    "tracking.report_to=[]",
    "tracking.progress=false",
    "train.eval_every=0",
    "optim.lr=1e-3",
    "value_optim.lr=1e-3",
    "ppo.value_warmup_steps=0",
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A policy directory to start from (a test-sized random model saved as an SFT output)."""
    out = tmp_path_factory.mktemp("policy")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def ppo(out, *extra, policy, timeout=300):
    return run_entry(
        "launch/stage3_ppo.py",
        f"policy={policy}",
        "reward_model=tiny-llama",
        *FAST,
        *extra,
        f"output_dir={out}",
        timeout=timeout,
    )


@pytest.mark.slow
def test_policy_changes_reference_does_not(sft_dir, tmp_path):
    result = ppo(tmp_path / "ppo", "train.max_steps=4", "train.save_every=2", policy=sft_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ppo"
    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((out / "manifest.json").read_text())
    # the reference's checksum, taken at the start and verified at the end of the run, is the SFT model's
    sft = build_policy(resolve(str(sft_dir)), ModelInit(), load_tokenizer(resolve(str(sft_dir)), ModelInit()))
    assert manifest["metrics"]["reference_fingerprint"] == fingerprint(sft.requires_grad_(False), frozen_only=True)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "score",
        "reward",
        "kl",
        "beta",
        "entropy",
        "clipfrac",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "explained_variance",
        "response_length",
        "eos_rate",
        "gold",
        "lr_policy",
        "lr_value",
        "time_generate_s",
        "time_score_s",
        "time_train_s",
        "tokens_per_s",
    ):
        assert f"train/ppo/{key}" in records[-1], key
    for key in ("rollout_tokens_per_s", "train_tokens_per_s", "mfu", "mfu_train", "max_rss_gb"):  # rlhf/perf.py
        assert 0 < records[-1][f"perf/{key}"] < (1 if "mfu" in key else float("inf")), key
    report = json.loads((out / "eval.json").read_text())
    assert {"before", "after", "final_kl"} <= set(report)
    assert (out / "value_model" / "config.json").is_file()


@pytest.mark.slow
def test_value_warmup_trains_the_value_model_only(sft_dir, tmp_path):
    out = tmp_path / "warm"
    result = ppo(out, "train.max_steps=2", "train.save_every=0", "ppo.value_warmup_steps=2", policy=sft_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before), "the policy moved during the value warm-up"
    records = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]
    assert [r["train/ppo/lr_policy"] for r in records] == [0.0, 0.0]
    assert all(r["train/ppo/lr_value"] > 0 and r["train/ppo/value_loss"] > 0 for r in records)


@pytest.mark.slow
def test_shared_trunk_value_head(sft_dir, tmp_path):
    """share_policy_trunk: one forward of the policy gives the logits and V(s_t) from its last hidden
    state; during the value warm-up only the head learns, and it is saved beside the policy."""
    from rlhf.registry import backbone
    from stages.ppo.models import PolicyAndValue, ValueHead, policy_logits

    source = resolve(str(sft_dir))
    policy = build_policy(source, ModelInit(), load_tokenizer(source, ModelInit())).eval()
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.score.weight)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits, values = PolicyAndValue(policy, head)(ids, mask, 3)
        _, no_logits_values = PolicyAndValue(policy, head)(ids, mask, 3, with_logits=False)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(policy)(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    torch.testing.assert_close(logits, policy_logits(policy, ids, mask, 3))
    torch.testing.assert_close(values, head(hidden)[:, -4:-1])
    torch.testing.assert_close(no_logits_values, values)

    out = tmp_path / "shared"
    result = ppo(
        out,
        "train.max_steps=2",
        "train.save_every=0",
        "ppo.value_warmup_steps=2",
        "share_policy_trunk=true",
        policy=sft_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before), "the trunk moved during the value warm-up"
    saved = load_file(out / "value_head.safetensors")
    assert set(saved) == {"score.weight", "score.bias"} and saved["score.weight"].abs().sum() > 0
    assert not (out / "value_model").exists()


@pytest.mark.slow
def test_lora_reference_is_the_policy_without_adapter(sft_dir, tmp_path):
    result = ppo(
        tmp_path / "lora", "train.max_steps=2", "train.save_every=0", "lora.enabled=true", "lora.r=4", policy=sft_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    sft = build_policy(resolve(str(sft_dir)), ModelInit(), load_tokenizer(resolve(str(sft_dir)), ModelInit()))
    assert manifest["metrics"]["reference_fingerprint"] == fingerprint(sft.requires_grad_(False), frozen_only=True)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "reward",
    [["reward_model=null", "reward.sources.rm=null", "reward.sources.subtraction={kind: rule, weight: 1.0}"], []],
    ids=["rule-only", "rm-only"],
)
def test_rule_only_and_reward_model_only(sft_dir, tmp_path, reward):
    result = ppo(tmp_path / "r", "train.max_steps=2", "train.save_every=0", *reward, policy=sft_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["finished"]


@pytest.mark.slow
def test_nan_reward_stops_before_the_weights(sft_dir, tmp_path):
    # A diverged reward model (NaN in its score head) scores every response NaN. (The config
    # refuses a NaN source weight, the way this test used to provoke it.)
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    diverged = build_scalar_model(source, ModelInit(), tokenizer, seed=0)
    with torch.no_grad():
        score_head(diverged).weight.fill_(float("nan"))
    diverged.save_pretrained(tmp_path / "nan_rm")
    tokenizer.save_pretrained(tmp_path / "nan_rm")
    result = ppo(tmp_path / "nan", "train.max_steps=2", f"reward_model={tmp_path / 'nan_rm'}", policy=sft_dir)
    assert result.returncode == 3
    assert "non-finite" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "nan" / "manifest.json").exists() and not (tmp_path / "nan" / "model.safetensors").exists()


# the reward model's scores (not the rule's, all -1 for a random policy) make every group's answers differ
GRPO_RESUME = ["ppo.advantage_estimator=grpo", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4"]
GRPO_RESUME += ["ppo.kl_in=loss", "ppo.kl_estimator=k3", "rollout.dynamic_sampling=true", "reward.sources.rm.weight=1"]


# the vLLM engine (`make vllm`): its own copy of the weights must be the resumed policy's, and its samples the same.
# Its policy is the built-in default's random shape: vLLM's CPU attention needs a head size of 32 or more.
VLLM = pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make vllm)")


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [[], GRPO_RESUME, pytest.param(["rollout.engine=vllm", "policy=tiny"], marks=VLLM)],
    ids=["gae", "grpo", "vllm"],
)
def test_killed_run_resumes_to_the_same_result(sft_dir, tmp_path, variant):
    args = ["train.max_steps=10", "train.save_every=3", "train.log_every=1", *variant]
    straight = ppo(tmp_path / "straight", *args, policy=sft_dir, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "launch/stage3_ppo.py"),
        *tiny_config("launch/stage3_ppo.py", ()),
        f"policy={sft_dir}",
        "reward_model=tiny-llama",
        *FAST,
        *args,
        f"output_dir={out}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.time() + 900  # a shared CPU can be slow
    while not (out / "checkpoints" / "step-3" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    resumed = ppo(out, *args, policy=sft_dir, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    last = lambda path: [r for r in read_metrics(path) if r["step"] == 10 and "train/ppo/score" in r][-1]  # noqa: E731
    x, y = last(tmp_path / "straight" / "metrics.jsonl"), last(out / "metrics.jsonl")
    keys = ["train/ppo/score", "train/ppo/kl", "train/ppo/policy_loss"]
    keys += ["train/ppo/kl_loss", "train/ppo/sampling_tries"] if variant == GRPO_RESUME else ["train/ppo/value_loss"]
    for key in keys:
        assert x[key] == pytest.approx(y[key], abs=1e-6), key


# the critic-free estimators answer each prompt 4 times; 4 prompts × 4 = 16 episodes a step and 40 steps keep
# six more runs affordable on a shared 2-core CPU
GROUPS = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4"]
SMALL = ["rollout.prompts_per_step=16", "ppo.minibatches=2", "train.max_steps=40"]
ESTIMATOR_RUNS = {
    "value-model": ["share_policy_trunk=false"],
    "shared-trunk": ["share_policy_trunk=true"],
    "grpo": [*SMALL, "ppo.advantage_estimator=grpo", *GROUPS, "ppo.kl_in=loss", "ppo.kl_estimator=k3"],
    "dr_grpo": [*SMALL, "ppo.advantage_estimator=dr_grpo", *GROUPS, "ppo.loss_agg=seq_mean_token_sum_norm"],
    "rloo": [*SMALL, "ppo.advantage_estimator=rloo", *GROUPS],
    # REINFORCE++ has no baseline but the batch mean: it needs the full batch of 32 and 60 steps
    "reinforce_pp": ["ppo.advantage_estimator=reinforce_pp"],
    "reinforce_pp_baseline": [
        "ppo.advantage_estimator=reinforce_pp_baseline",
        "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=4",
    ],
}


# the default estimator with the vLLM engine sampling
ENGINE_RUNS = {"vllm": ["share_policy_trunk=false", "rollout.engine=vllm", "policy=tiny"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*ESTIMATOR_RUNS, pytest.param("vllm", marks=VLLM)])
def test_policy_learns_what_the_reward_asks(sft_dir, tmp_path, monkeypatch, variant):
    """PPO does what it is for: with a rule that pays for digits, a random policy (about 2 % digits
    at first) writes mostly digits within a few dozen steps, with either critic and with each
    critic-free estimator."""
    import stages.ppo.train as ppo_train
    from rlhf.config import PPOStageConfig, load_config
    from rlhf.tasks import RULES

    def digit_share(questions, responses):
        return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]

    monkeypatch.setitem(RULES, "digits", digit_share)
    out = tmp_path / "learn"
    overrides = [
        f"policy={sft_dir}",
        "reward_model=null",
        "reward.sources.rm=null",
        "reward.sources.digits={kind: rule, weight: 1.0}",
    ]
    overrides += [*FAST, f"output_dir={out}", "train.max_steps=60", "train.save_every=0", "rollout.prompts_per_step=32"]
    overrides += ["ppo.minibatches=4", "ppo.epochs=2", "optim.lr=3e-3", "optim.scheduler=constant", "ppo.kl_coef=0.01"]
    overrides += ["reward.missing_eos_penalty=null"]
    overrides += ["ppo.value_warmup_steps=2", *{**ESTIMATOR_RUNS, **ENGINE_RUNS}[variant]]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    scores = [r["train/ppo/score"] for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.1 and last > 0.5, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["null", "bf16"])
def test_mixed_precision_multiplies_in_bf16_and_keeps_the_math_in_fp32(sft_dir, tmp_path, monkeypatch, precision):
    """model_init.mixed_precision=bf16: all four models multiply in bf16 while training (sampling,
    reference, reward, values, update) and log-probs, KL and losses stay fp32: with the policy's
    rate at 0 (value warm-up) the PPO ratio stays 1 and the approximate KL 0. The held-out
    evaluations before and after run in fp32 either way, like every stage's eval.json."""
    import rlhf.evaluation as evaluation
    import stages.ppo.models as ppo_models
    import stages.ppo.saving as ppo_saving
    import stages.ppo.train as ppo_train
    from rlhf.config import PPOStageConfig, load_config

    seen: dict[str, set] = {"policy": set(), "scalar": set(), "evaluation": set()}
    evaluating = []

    def record(name, output):
        seen["evaluation" if evaluating else name].add(output.dtype)

    def watched(build, name):
        def build_and_watch(*args, **kwargs):
            model = build(*args, **kwargs)
            first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            first.register_forward_hook(lambda module, inputs, output: record(name, output))
            return model

        return build_and_watch

    def evaluate_directory(*args, **kwargs):
        evaluating.append(True)
        try:
            return real_evaluate_directory(*args, **kwargs)
        finally:
            evaluating.pop()

    real_evaluate_directory = ppo_saving.evaluate_directory
    monkeypatch.setattr(ppo_saving, "evaluate_directory", evaluate_directory)
    for module in (ppo_models, evaluation):  # the stage's models, and the held-out evaluations'
        monkeypatch.setattr(module, "build_policy", watched(module.build_policy, "policy"))
        monkeypatch.setattr(module, "build_scalar_model", watched(module.build_scalar_model, "scalar"))
    out = tmp_path / precision
    overrides = [f"policy={sft_dir}", "reward_model=tiny-llama", *FAST, f"output_dir={out}", "train.max_steps=2"]
    overrides += ["train.save_every=0", "ppo.value_warmup_steps=2", f"model_init.mixed_precision={precision}"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == {"policy": {expected}, "scalar": {expected}, "evaluation": {torch.float32}}
    for record_ in [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]:
        assert record_["train/ppo/lr_policy"] == 0.0
        assert record_["train/ppo/ratio"] == pytest.approx(1.0, abs=2e-3)
        assert abs(record_["train/ppo/approx_kl"]) < 1e-4
        assert record_["train/ppo/value_loss"] > 0


# --- issue 14: runs you can trust -------------------------------------------------------------


def _ppo_config(*overrides):
    from rlhf.config import PPOStageConfig, load_config

    return load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [*FAST, *overrides])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.prompts_per_step=64", "ppo.minibatches=4", "train.grad_accum=3"], "train.grad_accum"),
        (["ppo.kl_estimator=k3"], "ppo.kl_estimator"),
        (["ppo.kl_estimator=k2"], "ppo.kl_estimator"),
        (["rollout.generation.do_sample=false"], "rollout.generation.do_sample"),
        (["rollout.generation.top_k=20"], "rollout.generation.top_k"),
        (["rollout.generation.top_p=0.9"], "rollout.generation.top_p"),
    ],
    ids=["grad-accum-not-dividing-minibatch", "k3-in-reward", "k2-in-reward", "greedy", "top-k", "top-p"],
)
def test_configs_that_would_train_silently_wrong_are_refused(overrides, key):
    """64 prompts / 4 minibatches / grad_accum 3 stepped 5 times per epoch with a gradient left over;
    k2/k3 in the reward barely regularise; truncated or greedy sampling is off-policy."""
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError) as error:
        _ppo_config("policy=tiny-llama", "reward_model=tiny-llama", *overrides)
    assert error.value.key == key, str(error.value)
    _ppo_config("policy=tiny-llama", "reward_model=tiny-llama", "train.grad_accum=2")  # 16 / 2 / 2: fine


def test_every_minibatch_is_one_optimizer_step_and_leaves_no_gradient():
    """ppo_update takes exactly epochs x minibatches optimizer steps, each of exactly grad_accum
    micro-batches, and leaves no gradient for the next rollout, even where grad_accum does not
    divide the minibatch (6 episodes, 4 micro-batches: a config the check refuses; the old split
    into micro-batches of 1 stepped 6 times instead of 4 per update)."""
    import dataclasses

    from accelerate import Accelerator

    from rlhf.precision import resolve_precision
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.models import build_models
    from stages.ppo.rollout import Rollout
    from stages.ppo.train import ppo_update

    cfg = _ppo_config("policy=tiny-llama", "reward_model=tiny-llama", "rollout.prompts_per_step=12", "ppo.epochs=2")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=4))  # minibatch 6
    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    models = build_models(cfg, accelerator, ESTIMATORS["gae"], resolve_precision(cfg.model_init))
    steps = []
    models.optimizer.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    g = torch.Generator().manual_seed(0)
    B, P, R = 12, 5, 4
    ids = torch.randint(4, 60, (B, P + R), generator=g)
    zeros = torch.zeros(B, R)
    rollout = Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_ids=ids[:, P:],
        response_mask=torch.ones(B, R, dtype=torch.long),
        loss_mask=torch.ones(B, R, dtype=torch.long),
        logprobs=zeros - 4.0,
        ref_logprobs=zeros - 4.0,
        values=zeros,
        kl=zeros,
        scores=torch.zeros(B),
        rewards=zeros,
        advantages=torch.randn(B, R, generator=g),
        returns=torch.randn(B, R, generator=g),
    )
    for update in (1, 2):
        ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step=update)
        assert len(steps) == update * cfg.ppo.epochs * cfg.ppo.minibatches
        leftover = [p for p in models.model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert not leftover, "a partial gradient is carried into the next rollout"


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_disable_dropout_also_switches_off_attention_dropout(preset):
    """HF attention applies `config.attention_dropout` functionally (no nn.Dropout module): after
    disable_dropout two forwards in train mode give the same log-probs."""
    from transformers import AutoModelForCausalLM

    from rlhf.registry.presets import PRESETS
    from stages.ppo.core_algos import logprobs_from_logits
    from stages.ppo.models import disable_dropout

    config = PRESETS[preset].make_config()
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    disable_dropout(model)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    first, second = (logprobs_from_logits(model(input_ids=ids).logits[:, :-1], ids[:, 1:]) for _ in range(2))
    assert model.training and torch.equal(first, second)
    assert all(not v for k, v in vars(model.config).items() if "dropout" in k and isinstance(v, float))


@pytest.mark.slow
def test_preset_policy_with_a_seed_is_its_own_reference_and_before(tmp_path):
    """policy=tiny-llama seed=3: the reference is the policy's initial weights (it was a seed-0
    model), and the "before" evaluation scores that same model."""
    from rlhf.evaluation import evaluate_generations, pick_samples
    from stages.ppo.prompts import load_prompts

    out = tmp_path / "seeded"
    args = ["seed=3", "train.max_steps=1", "train.save_every=0", "task.eval_size=4"]
    result = ppo(out, *args, policy="tiny-llama")
    assert result.returncode == 0, result.stderr[-3000:]
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    initial = build_policy(source, ModelInit(), tokenizer, seed=3).requires_grad_(False).eval()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["reference_fingerprint"] == fingerprint(initial, frozen_only=True)
    cfg = _ppo_config("policy=tiny-llama", "reward_model=tiny-llama", *args, f"output_dir={out}")
    prompts = load_prompts(cfg, tokenizer)
    metrics, items = evaluate_generations(initial, tokenizer, prompts.test_examples, cfg.task.name, cfg.generation)
    before = json.loads((out / "eval.json").read_text())["before"]
    assert before["split"] == "test" and before["n"] == 16  # test_per_bucket 8, two buckets
    assert before["samples"] == pick_samples(items) and before["accuracy"] == metrics["accuracy"]
    metrics, _ = evaluate_generations(initial, tokenizer, prompts.eval_examples, cfg.task.name, cfg.generation)
    assert before["validation"]["accuracy"] == metrics["accuracy"] and before["validation"]["n"] == 4


@pytest.mark.slow
def test_group_sampling_and_dynamic_sampling(sft_dir, tmp_path, monkeypatch):
    """samples_per_prompt answers each prompt n times in adjacent rows; dynamic sampling (DAPO)
    drops the groups whose scores are all equal and draws more prompts in their place. A rule that
    pays only for answers to prompts holding a 7 (by response length, so they differ) makes every
    other group all-zero: the kept groups are all sevens, and the dropped ones are logged."""
    import stages.ppo.train as ppo_train
    from rlhf.config import PPOStageConfig, load_config
    from rlhf.tasks import RULES

    def sevens(questions, responses):
        return [float(len(r) % 3) if "7" in q else 0.0 for q, r in zip(questions, responses, strict=True)]

    monkeypatch.setitem(RULES, "sevens", sevens)
    out = tmp_path / "groups"
    overrides = [
        f"policy={sft_dir}",
        "reward_model=null",
        "reward.sources.rm=null",
        "reward.sources.sevens={kind: rule, weight: 1.0}",
    ]
    overrides += [*FAST, f"output_dir={out}", "train.max_steps=3", "train.save_every=0", "tracking.samples_every=1"]
    overrides += ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "ppo.advantage_estimator=grpo"]
    overrides += ["ppo.kl_in=loss", "ppo.kl_estimator=k3"]  # grpo with the KL in the reward is refused
    overrides += ["rollout.dynamic_sampling=true", "rollout.max_sampling_tries=10", "reward.missing_eos_penalty=null"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    tables = [r for r in map(json.loads, lines) if r.get("table") == "samples/ppo"]
    assert len(tables) == 3
    for table in tables:
        prompts, scores = [row[0] for row in table["rows"]], [row[2] for row in table["rows"]]
        assert len(prompts) == 8 and prompts[0:4] == [prompts[0]] * 4 and prompts[4:8] == [prompts[4]] * 4
        assert prompts[0] != prompts[4] and "7" in prompts[0] and "7" in prompts[4]
        assert len(set(scores[0:4])) > 1 and len(set(scores[4:8])) > 1
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/dropped_groups" in r]
    assert len(steps) == 3 and sum(r["train/ppo/dropped_groups"] for r in steps) > 0
    assert all(r["train/ppo/sampling_tries"] >= 1 for r in steps)


def test_value_warmup_leaves_the_policy_optimizer_untouched_and_entropy_off_has_no_graph():
    """During the value warm-up the policy's lr is 0, but AdamW would still fold the policy gradients of a
    noisy critic into its moments (and count steps): its state must stay empty. With entropy_coef 0 the
    entropy is a statistic only: no graph over the (B, R, V) softmax."""
    from accelerate import Accelerator

    from rlhf.precision import resolve_precision
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.models import build_models
    from stages.ppo.optim import set_lr
    from stages.ppo.rollout import Rollout
    from stages.ppo.train import minibatch_loss, ppo_update

    cfg = _ppo_config("policy=tiny-llama", "reward_model=tiny-llama", "ppo.value_warmup_steps=1", "ppo.epochs=1")
    accelerator = Accelerator(cpu=True)
    models = build_models(cfg, accelerator, ESTIMATORS["gae"], resolve_precision(cfg.model_init))
    g = torch.Generator().manual_seed(0)
    B, P, R = cfg.rollout.episodes_per_step, 5, 4
    ids = torch.randint(4, 60, (B, P + R), generator=g)
    zeros = torch.zeros(B, R)
    rollout = Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_ids=ids[:, P:],
        response_mask=torch.ones(B, R, dtype=torch.long),
        loss_mask=torch.ones(B, R, dtype=torch.long),
        logprobs=zeros - 4.0,
        ref_logprobs=zeros - 4.0,
        values=zeros,
        kl=zeros,
        scores=torch.zeros(B),
        rewards=zeros,
        advantages=torch.randn(B, R, generator=g),
        returns=torch.randn(B, R, generator=g),
    )
    policy_group, value_group = models.optimizer.param_groups
    set_lr(models.optimizer, 0, cfg)
    ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step=0)
    state = models.optimizer.optimizer.state
    assert not any(p in state for p in policy_group["params"]), "the warm-up touched the policy's AdamW state"
    assert all(p in state for p in value_group["params"])
    set_lr(models.optimizer, 1, cfg)
    ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step=1)
    assert all(p in state for p in policy_group["params"])  # after the warm-up the policy trains

    _, stats = minibatch_loss(models.model, rollout.select(torch.arange(2)), cfg)
    assert cfg.ppo.entropy_coef == 0 and stats["entropy"].grad_fn is None
    with_bonus = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, entropy_coef=0.01))
    _, stats = minibatch_loss(models.model, rollout.select(torch.arange(2)), with_bonus)
    assert stats["entropy"].grad_fn is not None


def _rollout_of_lengths(lengths: list[int], P: int = 5, R: int = 4, seed: int = 0):
    """A rollout of random tokens whose loss masks hold `lengths` tokens (0: a row emptied, as
    ppo.mask_truncated empties a cut-off response's)."""
    from stages.ppo.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(4, 60, (B, P + R), generator=g)
    mask = (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).long()
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_ids=ids[:, P:],
        response_mask=torch.ones(B, R, dtype=torch.long),
        loss_mask=mask,
        logprobs=-4.0 - torch.rand(B, R, generator=g),
        ref_logprobs=-4.0 - torch.rand(B, R, generator=g),
        values=torch.randn(B, R, generator=g),
        kl=torch.zeros(B, R),
        scores=torch.zeros(B),
        rewards=torch.zeros(B, R),
        advantages=torch.randn(B, R, generator=g),
        returns=torch.randn(B, R, generator=g),
    )


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_a_minibatch_gradient_does_not_depend_on_how_it_is_split(agg):
    """One minibatch of episodes of unequal length (two emptied by truncation masking): its gradient is
    the same with grad_accum 1 and 2 (ppo_update through accelerate's accumulation) and on one process
    or two. Two processes are computed as DDP combines them: each rank's micro-batch loss with the
    minibatch's summed counts, its gradient averaged over the ranks. A mean of micro-batch means
    (the old aggregation) weighs a token of a short micro-batch more and fails all three."""
    from accelerate import Accelerator

    from rlhf.precision import resolve_precision
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.core_algos import loss_counts
    from stages.ppo.models import build_models
    from stages.ppo.train import minibatch_loss, ppo_update

    lengths = [4, 1, 0, 3, 1, 4, 0, 2]
    rollout = _rollout_of_lengths(lengths)
    overrides = ["policy=tiny-llama", "reward_model=tiny-llama", "rollout.prompts_per_step=8", "ppo.minibatches=1"]
    overrides += ["ppo.epochs=1", f"ppo.loss_agg={agg}", "ppo.kl_in=loss", "ppo.kl_estimator=k3"]
    overrides += ["ppo.entropy_coef=0.01", "optim.max_grad_norm=null", "value_optim.max_grad_norm=null"]
    base = _ppo_config(*overrides)

    def fresh(grad_accum: int):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=grad_accum))
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=True)
        return cfg, accelerator, build_models(cfg, accelerator, ESTIMATORS["gae"], resolve_precision(cfg.model_init))

    def update_gradient(grad_accum: int) -> list[torch.Tensor]:
        cfg, accelerator, models = fresh(grad_accum)
        params = [p for g in models.optimizer.param_groups for p in g["params"]]
        seen = []
        models.optimizer.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in params]))
        ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step=0, kl_coef=0.1)
        assert len(seen) == 1
        return seen[0]

    def two_process_gradient() -> list[torch.Tensor]:
        cfg, _, models = fresh(1)
        params = [p for g in models.optimizer.param_groups for p in g["params"]]
        counts = loss_counts(rollout.loss_mask, cfg.rollout.generation.max_new_tokens)  # all-reduced: both ranks'
        total = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            part = rollout.select(torch.arange(4 * rank, 4 * rank + 4))
            loss, _ = minibatch_loss(models.model, part, cfg, kl_coef=0.1, counts=counts, scale=2.0)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            total = [t + (g if g is not None else 0) / 2 for t, g in zip(total, grads, strict=True)]  # DDP's mean
        return total

    one = update_gradient(1)
    for other in (update_gradient(2), two_process_gradient()):
        worst = max((a - b).abs().max().item() for a, b in zip(one, other, strict=True))
        assert worst < 1e-6, f"{agg}: the gradient moved by {worst:.2e} when the minibatch was split"
    assert max(g.abs().max().item() for g in one) > 1e-3  # a gradient that is there


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(
    "precision",
    [
        ["model_init.dtype=float32", "model_init.mixed_precision=null"],
        ["model_init.dtype=float32", "model_init.mixed_precision=bf16"],
        ["model_init.dtype=bfloat16"],
    ],
    ids=["fp32", "fp32-autocast", "bf16-weights"],
)
def test_rollout_kl_is_exactly_zero_before_any_update(precision, lora):
    """At step 0 the policy is the reference, so the rollout's KL must be exactly 0 in every precision the
    configs allow. bf16 weights with full fine-tuning (as on a bf16 GPU) train fp32 weights under bf16
    autocast; a reference kept in bf16 then computes every norm and embedding differently."""
    from accelerate import Accelerator

    from rlhf.precision import resolve_precision
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.core_algos import KLController, RunningMoments
    from stages.ppo.engines import build_engine
    from stages.ppo.models import build_models
    from stages.ppo.prompts import load_prompts
    from stages.ppo.run import PPORun
    from stages.ppo.train import make_rollout

    overrides = ["policy=tiny-llama", "reward_model=tiny-llama", "rollout.prompts_per_step=4", "ppo.minibatches=1"]
    overrides += [*precision, *(["lora.enabled=true", "lora.r=4"] if lora else [])]
    # π_old from a forward, as in every bf16 mode: in fp32 the default takes it from the KV-cached sampling
    # pass, equal to a forward up to fp32 rounding (|KL| ≤ 1e-6 here), which is not what is tested here
    overrides += ["rollout.logprobs_from_generation=false"]
    cfg = _ppo_config(*overrides)
    resolved = resolve_precision(cfg.model_init)
    accelerator = Accelerator(mixed_precision=resolved.mixed, cpu=True)
    models = build_models(cfg, accelerator, ESTIMATORS["gae"], resolved)
    if lora:  # an adapter that is not zero yet would make the policy differ from its adapter-off reference
        assert all(p.abs().sum() == 0 for n, p in models.model.named_parameters() if "lora_B" in n)
    data = load_prompts(cfg, models.tokenizer)
    engine = build_engine("hf", models.model, models.tokenizer, accelerator, resolved, cfg.rollout)
    kl_ctl, running = KLController(cfg.ppo.kl_coef), RunningMoments()
    run = PPORun(
        cfg=cfg, accelerator=accelerator, models=models, engine=engine, data=data, kl_ctl=kl_ctl, running=running
    )
    rollout, *_ = make_rollout(run, [0, 1, 2, 3], 0)
    assert rollout.response_mask.sum() > 0
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs) and rollout.kl.abs().max().item() == 0.0


def test_a_value_warmup_covering_the_whole_run_is_warned_of():
    # a trial run cut to fewer steps than the recipe's warm-up would leave the policy as it started
    from stages.ppo.optim import warmup_note

    two = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=0.1)  # policy, value
    one = torch.optim.SGD([torch.zeros(1)], lr=0.1)  # no value model: no warm-up
    cfg = _ppo_config("ppo.value_warmup_steps=5", "train.max_steps=5")
    assert warmup_note(two, cfg) == (
        "ppo.value_warmup_steps=5 covers all train.max_steps=5: only the value model trains, "
        "the policy is never updated"
    )
    assert warmup_note(one, cfg) is None
    assert warmup_note(two, _ppo_config("ppo.value_warmup_steps=5", "train.max_steps=6")) is None
