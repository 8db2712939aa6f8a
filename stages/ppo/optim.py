"""PPO's optimizer set-up: one AdamW over two parameter groups (policy, value model: separate
learning rates and gradient clipping), the learning-rate schedule, and the DeepSpeed entries
accelerate cannot fill for a loop without a dataloader."""

from __future__ import annotations

import math

import torch

from rlhf.config import ConfigError, OptimConfig, PPOStageConfig
from rlhf.distributed import deepspeed_plugin, fill_zero3_sizes


def param_groups(policy: torch.nn.Module, value_model: torch.nn.Module | None, cfg: PPOStageConfig) -> list[dict]:
    """The policy's trainable parameters, then (if there is a value model) the value model's."""
    groups = [_group(policy, cfg.optim)]
    if value_model is not None:
        groups.append(_group(value_model, cfg.value_optim))
    return groups


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW over `groups`, with torch's fused kernel where every parameter is a floating-point
    CPU or CUDA tensor: one kernel for all tensors instead of ~10 per tensor. On the tiny PPO model
    (39 tensors) an optimizer step took 38.7 ms single-tensor, 8.8 ms foreach and 1.5 ms fused on
    this CPU: about a seventh of a critic-free update's time (docs/benchmarks.md)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def offloads_optimizer(ds_config: dict | None) -> bool:
    """Whether a DeepSpeed config (None: no DeepSpeed) puts the optimizer on the CPU or NVMe."""
    offload = ((ds_config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_optimizer(groups: list[dict], lr: float, ds_config: dict | None) -> torch.optim.Optimizer:
    """`adamw`, or DeepSpeed's CPU Adam (AdamW mode) where the DeepSpeed config offloads the
    optimizer: DeepSpeed refuses a torch optimizer there ("ZeRO-Offload with a client provided
    optimizer"), since its offloaded step runs on the CPU copy of the fp32 weights."""
    if not offloads_optimizer(ds_config):
        return adamw(groups, lr)
    # deepspeed is optional (`.[deepspeed]`): imported only by a run whose config offloads to it
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)


def _group(module: torch.nn.Module, optim: OptimConfig) -> dict:
    return {
        "params": [p for p in module.parameters() if p.requires_grad],
        "lr": optim.lr,
        "initial_lr": optim.lr,
        "weight_decay": optim.weight_decay,
        "betas": optim.betas,
    }


def lr_factor(step: int, max_steps: int, optim: OptimConfig) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
    warmup = round(optim.warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if optim.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay


def set_lr(optimizer, step: int, cfg: PPOStageConfig) -> None:
    """Each group's rate at `step`. The policy's rate is 0 during the value warm-up: a freshly
    initialised value model gives noisy advantages, and early policy steps on noise are hard to undo."""
    for group, optim in zip(optimizer.param_groups, (cfg.optim, cfg.value_optim), strict=False):
        group["lr"] = optim.lr * lr_factor(step, cfg.train.max_steps, optim)
    if step < cfg.ppo.value_warmup_steps and len(optimizer.param_groups) > 1:
        optimizer.param_groups[0]["lr"] = 0.0


def warmup_note(optimizer, cfg: PPOStageConfig) -> str | None:
    """A warning when the value warm-up covers the whole run: the policy would end exactly as it
    started (its rate 0 at every step), which a short trial run of a long recipe does silently."""
    if len(optimizer.param_groups) > 1 and cfg.ppo.value_warmup_steps >= cfg.train.max_steps:
        return (
            f"ppo.value_warmup_steps={cfg.ppo.value_warmup_steps} covers all train.max_steps="
            f"{cfg.train.max_steps}: only the value model trains, the policy is never updated"
        )
    return None


def drop_policy_gradients(optimizer) -> None:
    """During the value warm-up: the policy's gradients (group 0) set to None, so AdamW skips its
    parameters and leaves their moments and step count as they were; an lr of 0 alone keeps the
    weights but still folds the noisy critic's gradients into the moments the policy starts with.
    Under DeepSpeed the engine holds the gradients: there the lr of 0 is what holds."""
    for p in optimizer.param_groups[0]["params"]:
        p.grad = None


def clip_gradients(accelerator, model, cfg: PPOStageConfig) -> None:
    """Clip the policy's and the value model's gradients separately (each to its own max norm);
    under DeepSpeed the engine clips, as configured in its JSON."""
    if deepspeed_plugin(accelerator) is not None:
        return
    unwrapped = accelerator.unwrap_model(model)
    for module, optim in ((unwrapped.policy, cfg.optim), (unwrapped.value_model, cfg.value_optim)):
        if module is not None and optim.max_grad_norm is not None:
            accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], optim.max_grad_norm)


def fill_deepspeed_config(
    accelerator, cfg: PPOStageConfig, hidden_size: int, has_value_model: bool, model: torch.nn.Module
) -> None:
    """Fill the DeepSpeed config's "auto" entries that accelerate would read off a dataloader and
    a model config: PPO has no dataloader, and its module (policy + value) no single config; and
    ZeRO-3's gathering limits, sized from `model`'s largest layer (`fill_zero3_sizes`).
    The engine clips the gradient norm of the whole module, policy and value model together, to
    optim.max_grad_norm: a different value_optim.max_grad_norm would be ignored, so it is refused."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    if has_value_model and cfg.value_optim.max_grad_norm != cfg.optim.max_grad_norm:
        raise ConfigError(
            "value_optim.max_grad_norm",
            f"is {cfg.value_optim.max_grad_norm} but DeepSpeed clips policy and value model together to "
            f"optim.max_grad_norm ({cfg.optim.max_grad_norm}); set both the same",
        )
    micro = max(1, cfg.rollout.episodes_per_step // cfg.ppo.minibatches // cfg.train.grad_accum)
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = micro * cfg.train.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else 0.0
    zero = ds.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    fill_zero3_sizes(ds, model)
