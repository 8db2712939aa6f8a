"""Precision, decided once per stage: the weights' dtype, bf16 autocast or not, and the attention
kernel. `resolve_precision(init)` holds the one rule; every stage calls it at its start and hands
the `Precision` to the model builders, the Trainer's arguments, the Accelerator and any autocast
of its own, so that no two places can disagree about it.

Also here: `sdpa_fp32`, the attention kernel CPU bf16 autocast uses (registered with transformers
on import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf.config import ModelInit
from rlhf.distributed import deepspeed_launched

FP32_SDPA = "sdpa_fp32"


@dataclass(frozen=True)
class Precision:
    """How a stage's models hold weights and compute, resolved for this machine."""

    dtype: torch.dtype  # weights (and so gradients and optimizer state) of every model the stage builds
    mixed: Literal["bf16"] | None  # bf16 autocast over the weights; None: accelerate's own setting (off by default)
    attn_implementation: str | None  # for transformers; None: its default (sdpa)
    cuda: bool  # the models run on a CUDA GPU (else on the CPU)
    native_bf16: bool  # that device multiplies bf16 in hardware (a bf16 GPU; AVX512-BF16 or AMX on a CPU)

    def autocast(self, device_type: str) -> torch.autocast:
        """bf16 autocast on `device_type` under mixed bf16, a no-op context otherwise; for passes
        that run outside accelerate's own autocast (sampling before the Trainer exists)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.mixed == "bf16")

    def trainer_kwargs(self) -> dict:
        """TrainingArguments' precision fields. `bf16=True` is accelerate's bf16 autocast. With
        mixed bf16 it is the whole point (fp32 weights, bf16 multiplies). On a bf16 GPU the weights
        are already bf16 (dtype auto or bfloat16) and it adds little: the ops autocast keeps in fp32
        (softmax, norms, losses) stay fp32, and fp32 parts (PEFT's upcast LoRA adapters) multiply in
        bf16 with the rest. A GPU without bf16 never gets it: transformers refuses it there."""
        gpu_bf16 = self.cuda and self.native_bf16 and self.dtype == torch.bfloat16
        bf16 = gpu_bf16 or self.mixed == "bf16"
        # on a CPU transformers accepts bf16 only when told the run is on the CPU
        return {"bf16": bf16, "use_cpu": bf16 and not self.cuda}


def resolve_precision(init: ModelInit) -> Precision:
    """The one precision rule, for this machine:

    - `dtype: auto` -> bf16 weights on a CUDA GPU that supports bf16, fp32 elsewhere (a CPU, an
      older GPU); an explicit dtype is kept.
    - `mixed_precision: auto` -> "bf16" (autocast) only for fp32 weights on a CPU that multiplies
      bf16 natively (AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32) and
      without DeepSpeed (whose JSON config sets its own precision); else None. An explicit "bf16"
      or null is kept.
    - `attn_implementation`: as configured; unset under CPU bf16 autocast -> "sdpa_fp32", SDPA with
      autocast off (PyTorch's CPU SDPA backward is several times slower in bf16, and bf16 attention
      scores blur the position-exact attention arithmetic needs); else None (transformers' default).

    Called once at the start of a stage, before any Accelerator exists: DeepSpeed is known here
    only from `accelerate launch`'s environment."""
    cuda = torch.cuda.is_available()
    native_bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    if init.dtype == "auto":
        dtype = torch.bfloat16 if cuda and native_bf16 else torch.float32
    else:
        dtype = getattr(torch, init.dtype)
    mixed = init.mixed_precision
    if mixed == "auto":
        cpu_bf16 = not cuda and native_bf16 and not deepspeed_launched()
        mixed = "bf16" if dtype == torch.float32 and cpu_bf16 else None
    attn = init.attn_implementation
    if attn is None and mixed == "bf16" and not cuda:
        attn = FP32_SDPA
    return Precision(dtype=dtype, mixed=mixed, attn_implementation=attn, cuda=cuda, native_bf16=native_bf16)


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
