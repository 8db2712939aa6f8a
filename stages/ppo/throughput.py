"""The `perf/…` metrics of a PPO step: which of PPO's models run which passes over the rollout's
real tokens (rlhf/perf.py counts each pass's FLOPs), tokens per second and MFU.

Per step (`perf_metrics`), over every process's episodes:
  perf/rollout_tokens_per_s   response tokens sampled / the generation phase's seconds
  perf/train_tokens_per_s     prompt + response tokens × PPO epochs run / the update phase's seconds
  perf/mfu                    the step's model FLOPs / (the step's seconds × peak × processes)
  perf/mfu_train              the same for the update phase alone
  perf/max_memory_allocated_gb (CUDA) or perf/max_rss_gb (CPU: the process's peak resident memory)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.perf import FlopModel, flop_model, forward_flops, memory_metrics, mfu, train_flops
from stages.ppo.rollout import Rollout


@dataclass(frozen=True)
class StepCost:
    """What PPO runs each step, decided once when the models are built."""

    policy: FlopModel
    critic: FlopModel | None  # a value model with its own trunk; None: no critic, or a head on the policy's trunk
    shared_critic: bool  # the value head on the policy's trunk: the rollout's policy forward runs for the values
    reward: FlopModel | None  # the local reward model (None: rule rewards or a remote one only)
    full: bool  # every weight trained (False: LoRA adapters)
    checkpointing: bool  # gradient checkpointing: one more forward per backward
    reuse_logprobs: bool  # the rollout's log-probs from the sampling pass: no policy forward for them
    implicit: FlopModel | None = None  # the DPO model of an `implicit` reward source: a forward with its LM head


def step_cost(unwrapped, reward_model, cfg, reuse_logprobs: bool, implicit_model=None) -> StepCost:
    """The StepCost of the unwrapped PolicyAndValue `unwrapped`, the (placed) `reward_model` and
    `implicit_model`."""
    value_model = unwrapped.value_model
    separate = value_model is not None and hasattr(value_model, "config")  # not the shared trunk's ValueHead
    reward = getattr(reward_model, "module", reward_model)  # a ZeRO-3 inference engine wraps it
    implicit = getattr(implicit_model, "module", implicit_model)
    return StepCost(
        policy=flop_model(unwrapped.policy),
        critic=flop_model(value_model) if separate else None,
        shared_critic=value_model is not None and not separate,
        reward=flop_model(reward) if reward is not None else None,
        implicit=flop_model(implicit) if implicit is not None else None,
        full=not cfg.lora.enabled,
        checkpointing=cfg.model_init.gradient_checkpointing,
        reuse_logprobs=reuse_logprobs,
    )


def rollout_flops(cost: StepCost, lengths: list[int], response_tokens: int) -> float:
    """Steps 1-3: sampling (about one forward), the policy's forward for log-probs and values, the
    reference's, the value model's and the reward model's."""
    policy_pass = forward_flops(cost.policy, lengths, response_tokens)
    flops = 2 * policy_pass  # sampling, and the reference (its own copy, or the policy without its adapter)
    if not cost.reuse_logprobs:
        flops += policy_pass
    elif cost.shared_critic:  # the trunk still runs for the values, without the LM head
        flops += forward_flops(cost.policy, lengths, 0)
    for scalar in (cost.critic, cost.reward):
        if scalar is not None:
            flops += forward_flops(scalar, lengths, 0)
    if cost.implicit is not None:
        flops += forward_flops(cost.implicit, lengths, response_tokens)
    return flops


def update_flops(cost: StepCost, lengths: list[int], response_tokens: int, epochs: int) -> float:
    """Step 6: `epochs` forward-backward passes over the rollout, of the policy and of a value model
    with its own trunk."""
    flops = train_flops(cost.policy, lengths, response_tokens, full=cost.full, checkpointing=cost.checkpointing)
    if cost.critic is not None:
        flops += train_flops(cost.critic, lengths, 0, full=cost.full, checkpointing=cost.checkpointing)
    return epochs * flops


def perf_metrics(
    cost: StepCost, rollout: Rollout, epochs: int, timings: dict, peak_flops: float, accelerator
) -> dict[str, float]:
    """The step's `perf/…` metrics (module docstring); `timings` as the loop times its phases."""
    lengths = rollout.attention_mask.sum(1).tolist()  # real prompt + response tokens per episode
    response = int(rollout.response_mask.sum().item())
    local = [
        float(response),
        float(sum(lengths)),
        rollout_flops(cost, lengths, response),
        update_flops(cost, lengths, response, epochs),
    ]
    response, tokens, f_rollout, f_update = accelerator.reduce(
        torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum"
    ).tolist()
    processes = accelerator.num_processes
    seconds = sum(timings.values())
    return {
        "perf/rollout_tokens_per_s": response / max(timings["generate"], 1e-9),
        "perf/train_tokens_per_s": tokens * epochs / max(timings["train"], 1e-9),
        "perf/mfu": mfu(f_rollout + f_update, seconds, peak_flops * processes),
        "perf/mfu_train": mfu(f_update, timings["train"], peak_flops * processes),
        **memory_metrics(accelerator.device),
    }
