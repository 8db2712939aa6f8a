"""Precision is decided once, by `resolve_precision`: the weights' dtype, bf16 autocast and the
attention kernel for every machine a stage may run on; the Trainer's bf16 flag and the models the
registry builds follow the resolved value; `sdpa_fp32` attends exactly as eager fp32 attention.
What a stage trains is held in fp32 (bf16 weights lose AdamW's small steps), through the real entry
points; fp16, which would need a loss scaler, is refused."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import eager_attention_forward

import rlhf.precision
from conftest import ROOT, run_entry
from rlhf.config import ConfigError, LoraConfig, ModelInit, OptimConfig, SFTStageConfig, TrainConfig, load_config
from rlhf.distributed import deepspeed_plugin, is_zero3
from rlhf.hf_trainer import trainer_kwargs
from rlhf.precision import FP32_SDPA, Precision, resolve_precision
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (dtype, mixed_precision, attn_implementation, machine, native bf16, deepspeed)
#   -> (frozen weights dtype, trained weights dtype, autocast, attention)
# machine "cpu" or "cuda"; native bf16: AVX512-BF16/AMX on a CPU, bf16 support on a GPU.
CASES = [
    # CPU: fp32 weights; auto autocasts in bf16 only where the CPU multiplies bf16 natively
    (("auto", None, None, "cpu", True, False), (F32, F32, None, None)),
    (("auto", "auto", None, "cpu", True, False), (F32, F32, "bf16", FP32_SDPA)),
    (("auto", "auto", None, "cpu", False, False), (F32, F32, None, None)),  # emulated bf16 is slower
    (("auto", "auto", None, "cpu", True, True), (F32, F32, None, None)),  # DeepSpeed's JSON decides
    (("auto", "auto", "eager", "cpu", True, False), (F32, F32, "bf16", "eager")),  # a set kernel is kept
    (("auto", "bf16", None, "cpu", False, False), (F32, F32, "bf16", FP32_SDPA)),  # explicit bf16 is kept
    (("auto", "bf16", None, "cpu", True, True), (F32, F32, "bf16", FP32_SDPA)),
    # bf16 weights: what trains is fp32 under bf16 autocast (fp32 master weights), frozen models bf16
    (("bfloat16", "auto", None, "cpu", True, False), (BF16, F32, "bf16", FP32_SDPA)),
    (("bfloat16", None, "sdpa", "cpu", True, False), (BF16, F32, "bf16", "sdpa")),
    (("bfloat16", None, None, "cpu", True, True), (BF16, BF16, None, None)),  # DeepSpeed keeps fp32 masters
    (("float32", "auto", None, "cpu", True, False), (F32, F32, "bf16", FP32_SDPA)),
    # CUDA: bf16 comes from dtype auto on a bf16 GPU (never from auto autocast): frozen models in
    # bf16, trained ones fp32 under bf16 autocast; DeepSpeed trains the bf16 weights itself
    (("auto", "auto", None, "cuda", True, False), (BF16, F32, "bf16", None)),
    (("auto", None, None, "cuda", True, False), (BF16, F32, "bf16", None)),
    (("auto", "auto", None, "cuda", False, False), (F32, F32, None, None)),  # a GPU without bf16
    (("auto", "bf16", None, "cuda", True, False), (BF16, F32, "bf16", None)),  # GPU autocast: plain sdpa
    (("auto", "bf16", None, "cuda", False, False), (F32, F32, "bf16", None)),
    (("float32", "auto", None, "cuda", True, False), (F32, F32, None, None)),
    (("auto", "auto", "flash_attention_2", "cuda", True, True), (BF16, BF16, None, "flash_attention_2")),
]


def on_machine(monkeypatch, machine: str, native: bool, deepspeed: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: machine == "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    monkeypatch.setattr(rlhf.precision, "cpu_has_native_bf16", lambda: native)
    if deepspeed:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    else:
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.mark.parametrize(("given", "expected"), CASES, ids=lambda v: "-".join(map(str, v)))
def test_resolve_precision_rule(monkeypatch, given, expected):
    dtype, mixed, attn, machine, native, deepspeed = given
    on_machine(monkeypatch, machine, native, deepspeed)
    p = resolve_precision(ModelInit(dtype=dtype, mixed_precision=mixed, attn_implementation=attn))
    assert (p.dtype, p.trained_dtype, p.mixed, p.attn_implementation) == expected
    assert p.cuda == (machine == "cuda") and p.native_bf16 == native


def test_this_cpu_resolves_auto_to_bf16_autocast_when_it_multiplies_bf16(monkeypatch):
    """The real machine, nothing patched: what configs/tiny/{rm,ppo}.yaml get here."""
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CPU rule")
    p = resolve_precision(ModelInit(mixed_precision="auto"))
    native = rlhf.precision.cpu_has_native_bf16()
    assert (p.dtype, p.mixed, p.attn_implementation) == ((F32, "bf16", FP32_SDPA) if native else (F32, None, None))


@pytest.mark.parametrize(
    ("precision", "bf16", "use_cpu"),
    [
        (Precision(F32, "bf16", FP32_SDPA, cuda=False, native_bf16=True), True, True),  # CPU autocast
        (Precision(F32, None, None, cuda=False, native_bf16=True), False, False),
        (Precision(BF16, None, None, cuda=False, native_bf16=True), False, False),  # CPU bf16 weights: no autocast
        (Precision(BF16, None, None, cuda=True, native_bf16=True), True, False),  # bf16 GPU: bf16 weights
        (Precision(BF16, None, None, cuda=True, native_bf16=False), False, False),  # transformers refuses it
        (Precision(F32, None, None, cuda=True, native_bf16=True), False, False),  # dtype: float32 asked for
        (Precision(F16, None, None, cuda=True, native_bf16=True), False, False),
        (Precision(F32, "bf16", None, cuda=True, native_bf16=True), True, False),
    ],
)
def test_trainer_bf16_follows_the_precision(tmp_path, precision, bf16, use_cpu):
    assert precision.trainer_kwargs() == {"bf16": bf16, "use_cpu": use_cpu}
    kwargs = trainer_kwargs(tmp_path, 0, OptimConfig(), TrainConfig(), ModelInit(), precision, progress=False)
    assert (kwargs["bf16"], kwargs["use_cpu"]) == (bf16, use_cpu)


def test_autocast_follows_the_precision():
    with Precision(F32, "bf16", FP32_SDPA, cuda=False, native_bf16=True).autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    with Precision(F32, None, None, cuda=False, native_bf16=True).autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_builders_take_the_declared_dtype_and_attention():
    source = resolve("tiny")
    init = ModelInit()  # resolves to fp32 / sdpa here: the passed precision must win
    tokenizer = load_tokenizer(source, init)
    for precision in (
        Precision(BF16, None, "eager", cuda=False, native_bf16=True),
        Precision(F32, "bf16", FP32_SDPA, cuda=False, native_bf16=True),
    ):
        for build in (build_policy, build_scalar_model):
            model = build(source, init, tokenizer, seed=0, precision=precision)
            assert model.dtype == precision.dtype
            assert model.config._attn_implementation == precision.attn_implementation


def test_sdpa_fp32_attends_as_eager_fp32(monkeypatch):
    """The whole tiny model with either kernel in fp32 (left padding, as generation pads), then the
    kernel alone on bf16 projections under autocast: it attends in fp32, as eager does on the same
    inputs upcast, and hands back the projections' dtype."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    tokenizer.padding_side = "left"
    ids = tokenizer(["请计算：12 - 3 = ", "请计算：99999 - 12345 = "], return_tensors="pt", padding=True)

    def logits(attn: str) -> torch.Tensor:
        precision = Precision(F32, None, attn, cuda=False, native_bf16=True)
        model = build_policy(source, ModelInit(), tokenizer, seed=0, precision=precision).eval()
        with torch.no_grad():
            return model(**ids).logits  # (B, T, V)

    real = ids["attention_mask"].bool()
    assert torch.allclose(logits(FP32_SDPA)[real], logits("eager")[real], atol=1e-5)

    torch.manual_seed(0)
    B, heads, T, D = 2, 4, 7, 8
    q, k, v = (torch.randn(B, heads, T, D).to(BF16) for _ in range(3))
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)  # (B, 1, T, T)
    with torch.autocast("cpu", dtype=BF16):
        out, _ = rlhf.precision._sdpa_in_fp32(module, q, k, v, causal == 0, scaling=D**-0.5)
    expected, _ = eager_attention_forward(module, q.float(), k.float(), v.float(), causal, scaling=D**-0.5)
    assert out.dtype == BF16
    assert torch.allclose(out.float(), expected, rtol=2**-8, atol=1e-6)  # fp32 attention, rounded once to bf16


def test_one_deepspeed_check():
    plugin = SimpleNamespace(zero_stage=3)
    with_ds = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    without = SimpleNamespace(state=SimpleNamespace())
    assert deepspeed_plugin(with_ds) is plugin and deepspeed_plugin(without) is None
    assert is_zero3(with_ds) and not is_zero3(without)
    plugin.zero_stage = 2
    assert not is_zero3(with_ds)


def test_trained_parameters_are_fp32_frozen_ones_keep_bf16():
    """bf16 weights: a model the stage trains holds every trainable parameter in fp32 (the whole
    model; with LoRA the adapters and PEFT's modules_to_save head `score`), a frozen one stays bf16,
    and so does a LoRA model's frozen base."""
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    precision = Precision(BF16, "bf16", None, cuda=False, native_bf16=True, trained_dtype=F32)
    for build in (build_policy, build_scalar_model):
        for lora in (LoraConfig(), LoraConfig(enabled=True, r=4)):
            frozen = build(source, ModelInit(), tokenizer, seed=0, precision=precision)
            assert {p.dtype for p in frozen.parameters()} == {BF16}
            model = build(source, ModelInit(), tokenizer, lora, seed=0, precision=precision, trained=True)
            trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
            assert set(trained.values()) == {F32}, trained
            if lora.enabled:
                assert {p.dtype for p in model.parameters() if not p.requires_grad} == {BF16}
            if lora.enabled and build is build_scalar_model:
                assert any("score" in n for n in trained)  # the head trains, in fp32


def test_float16_weights_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'model_init.dtype'.*loss scaler.*bfloat16"):
        load_config(SFTStageConfig, None, ["model_init.dtype=float16"])


def test_accelerate_fp16_is_refused_where_it_would_apply(monkeypatch):
    """`accelerate launch --mixed_precision fp16` (or its config file) reaches a stage as
    ACCELERATE_MIXED_PRECISION=fp16; it applies when model_init.mixed_precision is null."""
    on_machine(monkeypatch, "cuda", True, False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"'model_init.mixed_precision'.*fp16.*NaN"):
        resolve_precision(ModelInit(dtype="float32"))
    assert resolve_precision(ModelInit(dtype="float32", mixed_precision="bf16")).mixed == "bf16"  # ours wins
    assert resolve_precision(ModelInit()).mixed == "bf16"  # bf16 GPU: trained weights fp32 under bf16 autocast


# ---- through the real entry points: a bf16 run trains fp32 weights, and every weight moves ----

LR = "1e-5"  # AdamW's step is ~lr: far below bf16's resolution around weights of ~0.02 to 1


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A test-sized model saved in bf16, as hub checkpoints are."""
    out = tmp_path_factory.mktemp("bf16")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).to(BF16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def changed_fraction(start: dict, saved: dict) -> float:
    """Share of the starting weights that the run moved, over the weights both hold; the embeddings
    aside, whose rows of tokens the run never saw get no gradient."""
    keys = [k for k in start if k in saved and "embed_tokens" not in k]
    moved = sum(int((saved[k].float() != start[k].float()).sum()) for k in keys)
    return moved / sum(start[k].numel() for k in keys)


def stage_run(stage: str, model_dir, out, *extra):
    common = [f"output_dir={out}", "model_init.dtype=bfloat16", "tracking.report_to=[]", "tracking.progress=false"]
    common += ["train.save_every=0", "optim.warmup_ratio=0", f"optim.lr={LR}"]
    if stage == "sft":
        args = [
            "launch/stage1_sft.py",
            f"model={model_dir}",
            "task.train_size=64",
            "task.eval_size=4",
            "task.test_per_bucket=2",
        ]
        args += ["train.batch_size=8", "train.max_steps=6", "evaluate_base=false", "generation.max_new_tokens=4"]
    elif stage == "rm":
        args = ["launch/stage2_rm.py", f"model={model_dir}", "pairs.train_size=64", "pairs.eval_size=8"]
        args += ["pairs.onpolicy_fraction=0", "loss.lm_coef=0", "train.batch_size=8", "train.max_steps=6"]
    else:
        args = ["launch/stage3_ppo.py", f"policy={model_dir}", f"value_model={model_dir}", "reward_model=tiny-llama"]
        args += ["task.train_size=64", "task.eval_size=4", "task.test_per_bucket=2", "rollout.prompts_per_step=8"]
        args += ["ppo.minibatches=2"]
        args += ["rollout.generation.max_new_tokens=4", "generation.max_new_tokens=4", "train.max_steps=3"]
        args += [f"value_optim.lr={LR}", "ppo.value_warmup_steps=0", "train.eval_every=0"]
    result = run_entry(*args, *common, *extra)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_bf16_run_trains_fp32_weights_that_all_move(bf16_dir, tmp_path, stage):
    """model_init.dtype=bfloat16, full fine-tuning at lr 1e-5: the weights the stage trains are fp32
    (saved so) and nearly all of them move; in bf16 most AdamW steps would round to nothing."""
    out = tmp_path / stage
    stage_run(stage, bf16_dir, out)
    start = load_file(bf16_dir / "model.safetensors")
    outputs = [out / "model.safetensors"] + ([out / "value_model" / "model.safetensors"] if stage == "ppo" else [])
    for path in outputs:
        saved = load_file(path)
        assert {t.dtype for t in saved.values()} == {F32}, path
        assert changed_fraction(start, saved) > 0.95, (path, changed_fraction(start, saved))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_bf16_lora_run_trains_fp32_adapters_and_heads(bf16_dir, tmp_path, stage):
    """With LoRA the bf16 base stays frozen; the adapters and PEFT's modules_to_save head (the
    reward / value model's `score`) train in fp32 and move."""
    out = tmp_path / stage
    stage_run(stage, bf16_dir, out, "lora.enabled=true", "lora.r=4")
    adapter = load_file((out / "value_model" if stage == "ppo" else out) / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {F32}, {k: t.dtype for k, t in adapter.items()}
    heads = [k for k in adapter if "score" in k]
    assert heads and all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)


@pytest.mark.slow
def test_float16_and_accelerate_fp16_stop_before_anything_is_written(tmp_path):
    """fp16 trains without a loss scaler here: refused with one line naming the key, exit 2, before
    the output directory exists; accelerate's fp16 reaches PPO's Accelerator through the env."""
    tiny = ["tracking.report_to=[]", "tracking.progress=false", "train.max_steps=1", "train.save_every=0"]
    tiny += ["task.train_size=16", "task.eval_size=2", "task.test_per_bucket=1", "generation.max_new_tokens=2"]
    sft = ["launch/stage1_sft.py", "model=tiny-llama", "evaluate_base=false", *tiny]
    ppo = ["launch/stage3_ppo.py", "policy=tiny-llama", "reward_model=tiny-llama", *tiny]
    ppo += ["rollout.prompts_per_step=4", "ppo.minibatches=1", "rollout.generation.max_new_tokens=2"]
    ppo += ["model_init.mixed_precision=null"]  # auto would pick bf16 on a CPU that has it: ours wins
    out = tmp_path / "f16"
    result = run_entry(*sft, "model_init.dtype=float16", f"output_dir={out}")
    last = (result.stderr.strip().splitlines() or [""])[-1]
    assert result.returncode == 2 and "'model_init.dtype'" in last, result.stderr[-3000:]
    assert not out.exists()
    for args in (sft, ppo):
        out = tmp_path / args[0][-6:-3]
        result = run_entry(*args, f"output_dir={out}", env={"ACCELERATE_MIXED_PRECISION": "fp16"})
        last = (result.stderr.strip().splitlines() or [""])[-1]
        assert result.returncode == 2 and "'model_init.mixed_precision'" in last and "fp16" in last, result.stderr[
            -3000:
        ]
        assert not out.exists()


@pytest.mark.parametrize(
    ("machine", "native", "deepspeed", "expected"),
    [
        ("cuda", True, True, "bf16"),  # bf16 weights trained by DeepSpeed: its bf16 (fp32 master weights) must be on
        ("cuda", True, False, "bf16"),  # fp32 trained weights under bf16 autocast, as before
        ("cuda", False, True, None),  # fp32 weights on a GPU without bf16: nothing to turn on
        ("cpu", False, True, None),
    ],
)
def test_accelerator_mixed_turns_deepspeed_bf16_on_for_bf16_weights(monkeypatch, machine, native, deepspeed, expected):
    """PPO built its Accelerator with `mixed=None` under DeepSpeed on a bf16 GPU, which resolves
    `"bf16": {"enabled": "auto"}` in configs/deepspeed/zero3.json to off: bf16 weights stepped by a
    plain optimizer with no fp32 master copy. `accelerator_mixed` is what the Accelerator gets."""
    on_machine(monkeypatch, machine, native, deepspeed)
    p = resolve_precision(ModelInit(dtype="auto", mixed_precision="auto"))
    assert p.accelerator_mixed == expected


def test_deepspeed_bf16_auto_resolves_on_from_accelerator_mixed(monkeypatch):
    # accelerate's own resolution of the JSON's "auto" from what `accelerator_mixed` hands it
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    on_machine(monkeypatch, "cuda", True, True)
    p = resolve_precision(ModelInit(dtype="auto", mixed_precision="auto"))
    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / "configs/deepspeed/zero3.json"))
    plugin.set_mixed_precision(p.accelerator_mixed)
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
