"""Precision, decided once per stage: the weights' dtype (of frozen models and of trained ones),
bf16 autocast or not, and the attention kernel. `resolve_precision(init)` holds the one rule;
every stage calls it at its start and hands the `Precision` to the model builders, the Trainer's
arguments, the Accelerator and any autocast of its own, so that no two places can disagree.

Also here: `sdpa_fp32`, the attention kernel CPU bf16 autocast uses (registered with transformers
on import)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf.config import ConfigError, ModelInit
from rlhf.distributed import deepspeed_launched

FP32_SDPA = "sdpa_fp32"


@dataclass(frozen=True)
class Precision:
    """How a stage's models hold weights and compute, resolved for this machine."""

    dtype: torch.dtype  # weights of the models the stage does not train (reference, PPO's reward model, a LoRA base)
    mixed: Literal["bf16"] | None  # bf16 autocast over the weights; None: accelerate's own setting (off by default)
    attn_implementation: str | None  # for transformers; None: its default (sdpa)
    cuda: bool  # the models run on a CUDA GPU (else on the CPU)
    native_bf16: bool  # that device multiplies bf16 in hardware (a bf16 GPU; AVX512-BF16 or AMX on a CPU)
    # weights (and so gradients and AdamW state) of the parameters the stage trains: a whole model,
    # PPO's value head, LoRA adapters and PEFT's modules_to_save heads. fp32 unless DeepSpeed keeps
    # its own fp32 master copy; see `resolve_precision`.
    trained_dtype: torch.dtype = torch.float32

    @property
    def accelerator_mixed(self) -> Literal["bf16"] | None:
        """What an Accelerator the stage builds itself gets as `mixed_precision`. Under DeepSpeed
        with bf16 trained weights it is "bf16": that is what resolves `"bf16": {"enabled": "auto"}`
        in configs/deepspeed/*.json to on, DeepSpeed's bf16 mode whose optimizer steps fp32 master
        weights (with None it resolved to off: bf16 weights stepped in bf16, fp32 communication).
        accelerate adds no autocast of its own under DeepSpeed. Elsewhere: `mixed`."""
        return "bf16" if self.trained_dtype == torch.bfloat16 else self.mixed

    @property
    def matmul_dtype(self) -> Literal["bf16", "fp32"]:
        """What the models' matrix multiplies run in: the peak MFU is measured against."""
        return "bf16" if self.dtype == torch.bfloat16 or self.mixed == "bf16" else "fp32"

    def autocast(self, device_type: str) -> torch.autocast:
        """bf16 autocast on `device_type` under mixed bf16, a no-op context otherwise; for passes
        that run outside accelerate's own autocast (sampling before the Trainer exists)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.mixed == "bf16")

    def trainer_kwargs(self) -> dict:
        """TrainingArguments' precision fields. `bf16=True` is accelerate's bf16 autocast. With
        mixed bf16 it is the whole point (fp32 weights, bf16 multiplies). Under DeepSpeed on a bf16
        GPU the weights stay bf16 and it turns on DeepSpeed's bf16 (`"bf16": {"enabled": "auto"}`),
        whose optimizer keeps the fp32 master weights. A GPU without bf16 never gets it from the
        weights: transformers refuses it there."""
        gpu_bf16 = self.cuda and self.native_bf16 and self.dtype == torch.bfloat16
        bf16 = gpu_bf16 or self.mixed == "bf16"
        # on a CPU transformers accepts bf16 only when told the run is on the CPU
        return {"bf16": bf16, "use_cpu": bf16 and not self.cuda}


def resolve_precision(init: ModelInit) -> Precision:
    """The one precision rule, for this machine:

    - `dtype: auto` -> bf16 weights on a CUDA GPU that supports bf16, fp32 elsewhere (a CPU, an
      older GPU); an explicit dtype is kept. That is the dtype of the frozen models.
    - Trained parameters are fp32 whatever `dtype` says, unless DeepSpeed runs the optimizer (its
      ZeRO optimizer keeps fp32 master weights of bf16 ones). AdamW steps of ~lr are far below
      bf16's resolution (2^-8 relative): applied to bf16 weights most of them round to nothing (85 %
      of the weights unchanged after 10 steps at lr 1e-5). This is what careful trainers do:
      OpenRLHF trains through DeepSpeed's fp32 master weights, PEFT upcasts adapters to fp32
      (`autocast_adapter_dtype`), torch AMP and accelerate keep fp32 weights under bf16 autocast.
      bf16 weights upcast so -> `mixed` "bf16": the multiplies stay bf16, as `dtype` asked.
    - `mixed_precision: auto` -> "bf16" (autocast) only for fp32 weights on a CPU that multiplies
      bf16 natively (AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32) and
      without DeepSpeed (whose JSON config sets its own precision); else None. An explicit "bf16"
      or null is kept.
    - `attn_implementation`: as configured; unset under CPU bf16 autocast -> "sdpa_fp32", SDPA with
      autocast off (PyTorch's CPU SDPA backward is several times slower in bf16, and bf16 attention
      scores blur the position-exact attention arithmetic needs); else None (transformers' default).

    - fp16 is refused: it needs a loss scaler (its 5-bit exponent underflows small gradients and
      overflows to inf, then NaN), which the stages do not run. `model_init.dtype: float16` fails in
      `ModelInit.check`; accelerate's fp16 (`accelerate launch --mixed_precision fp16` or its config
      file, which reach every stage as ACCELERATE_MIXED_PRECISION) fails here, where it would apply.

    Called once at the start of a stage, before any Accelerator exists: DeepSpeed and accelerate's
    mixed precision are known here only from `accelerate launch`'s environment."""
    cuda = torch.cuda.is_available()
    native_bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    if init.dtype == "auto":
        dtype = torch.bfloat16 if cuda and native_bf16 else torch.float32
    else:
        dtype = getattr(torch, init.dtype)
    trained_dtype = dtype if deepspeed_launched() else torch.float32
    mixed = init.mixed_precision
    if mixed == "auto":
        cpu_bf16 = not cuda and native_bf16 and not deepspeed_launched()
        mixed = "bf16" if dtype == torch.float32 and cpu_bf16 else None
    if trained_dtype != dtype:
        mixed = "bf16"  # fp32 master weights for what trains, bf16 multiplies as `dtype` asked
    if mixed is None:
        _refuse_accelerate_fp16()
    attn = init.attn_implementation
    if attn is None and mixed == "bf16" and not cuda:
        attn = FP32_SDPA
    return Precision(
        dtype=dtype,
        mixed=mixed,
        attn_implementation=attn,
        cuda=cuda,
        native_bf16=native_bf16,
        trained_dtype=trained_dtype,
    )


def _refuse_accelerate_fp16() -> None:
    """accelerate's own mixed precision applies when ours is null; refuse its fp16. (With fp16 on a
    GPU accelerate would scale the loss, but PPO's loop and its non-finite checks do not skip the
    steps a scaler skips; refusing is the one rule for every stage.) Read as accelerate reads it."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() == "fp16":
        raise ConfigError(
            "model_init.mixed_precision",
            "is null, so accelerate's mixed precision applies, and it is fp16 (ACCELERATE_MIXED_PRECISION=fp16, "
            "from `accelerate launch --mixed_precision fp16` or its config file): fp16 without a loss scaler ends "
            "in NaN; set model_init.mixed_precision=bf16 or launch with --mixed_precision no",
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 autocast
    is emulated and slower than fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """SDPA with autocast off: queries, keys and values (bf16 from the projections) are attended in
    fp32, and the output goes back to the projections' dtype."""
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


# Registered once, with SDPA's masks (padding included); a saved config never names it, so plain
# transformers reloads every model this project writes.
AttentionInterface.register(FP32_SDPA, _sdpa_in_fp32)
AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
