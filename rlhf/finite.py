"""One non-finite check for every trainer: the SFT/RM/DPO Trainer callback (rlhf/hf_trainer.py
`FiniteGuard`) and PPO's loop (stages/ppo/train.py) ask the same question of weights and gradients,
so they share one answer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.utils import get_total_norm


def finite_flag(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0 if every tensor is finite, else NaN or inf: the largest |x| over all of them, in one
    foreach pass (a NaN anywhere makes it NaN, an inf inf) and one check, where a check per tensor
    cost a sixteenth of a small model's update. Under ZeRO-3 a parameter's own data is this
    process's shard (`ds_tensor`), which may be empty. 0-d, on the CPU."""
    data = [d for d in (getattr(t, "ds_tensor", t) for t in tensors) if d.numel()]
    largest = get_total_norm(data, norm_type=float("inf"))
    return largest.cpu() * 0
