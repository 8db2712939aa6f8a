"""Advantage estimators and how well the value model explains the returns.

The registry contract. An estimator is a pure function on (B, T) tensors,

    fn(rewards, values, mask, *, gamma, lam, group_size) -> (advantages, returns)

- rewards (B, T): per-token rewards, the sequence score at the last real token plus −β·KL at every
  token when `ppo.kl_in: reward` (0 elsewhere on padding); values (B, T) or None; mask (B, T).
- group_size: `rollout.samples_per_prompt`; rows i·n … i·n + n − 1 answer the same prompt.
- advantages (B, T) and returns (B, T), both 0 on padding. Returns are the value model's targets
  and are ignored when there is no critic.

It is registered with `@register_estimator(name, …)` (veRL's `register_adv_est`), which adds an
`Estimator` to `ESTIMATORS` saying whether it needs a critic (when not, the
recipe builds, trains and saves no value model and `values` is None), whether it needs groups
(`rollout.samples_per_prompt` > 1, refused before anything loads otherwise) and whether its
advantages are whitened over the whole batch afterwards (`ppo.whiten_advantages: null` follows
this; the recipe does it, over every process's episodes). `ppo.advantage_estimator` picks one;
outside code adds one by decorating its own function the same way (tests/test_ppo_seams.py).

The group estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline) treat a response as one action
with the sequence reward R = Σ_t r_t (the score, minus β·Σ KL when the KL is in the reward), as
their papers do, and give every token of a response the same advantage (outcome supervision);
γ and λ are not used by them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.config import ConfigError, PPOStageConfig
from stages.ppo.core_algos import last_index, masked, masked_sums, masked_whiten, moments


@dataclass(frozen=True)
class Estimator:
    """fn(rewards, values | None, mask, *, gamma, lam, group_size) -> advantages, returns; all (B, T)."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool  # False: no value model is built, loaded, trained or saved
    needs_groups: bool = False  # True: rollout.samples_per_prompt must be > 1
    # whiten the advantages over the whole batch (every process) when ppo.whiten_advantages is null: PPO's usual
    # practice, and REINFORCE++'s global normalisation. The group estimators already compare like with like
    # (OpenRLHF and TRL do not whiten them again).
    whiten: bool = True


# name -> Estimator, filled by @register_estimator below (and by outside code, before the run starts)
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(
    name: str, *, needs_critic: bool, needs_groups: bool = False, whiten: bool = True
) -> Callable[[Callable], Callable]:
    """Register the decorated function as the advantage estimator `name` (veRL's `register_adv_est`):
    `ppo.advantage_estimator: name` then picks it. Outside code adds one by decorating its function
    in a module imported before `train()` runs; a name taken already is refused, so that a plug-in
    never silently replaces a built-in."""

    def register(fn: Callable) -> Callable:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered already ({ESTIMATORS[name].fn.__qualname__})")
        ESTIMATORS[name] = Estimator(fn, needs_critic=needs_critic, needs_groups=needs_groups, whiten=whiten)
        return fn

    return register


def get_estimator(name: str) -> Estimator:
    """The estimator registered as `name`; an unknown one is refused in one line naming the known ones."""
    if name not in ESTIMATORS:
        raise ConfigError("ppo.advantage_estimator", f"unknown {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), per token, backwards:
      δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t,
    with V = 0 past the last real token (the episode ends at EOS). rewards, values, mask (B, T)
    -> advantages (B, T), returns (B, T); both 0 on padding."""
    rewards, values, mask = masked(rewards.float(), mask), masked(values.float(), mask), mask.float()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = masked(delta + gamma * lam * next_advantage, mask[:, t])
        advantages[:, t] = next_advantage
    returns = masked(advantages + values, mask)
    return advantages, returns


@register_estimator("gae", needs_critic=True)
def gae_estimator(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` as a registered estimator (it needs the critic's values; groups play no part)."""
    if values is None:
        raise ValueError("the gae estimator needs the value model's values")
    return gae(rewards, values, mask, gamma, lam)


def _grouped(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """The sequence rewards R = Σ_t r_t, as (B / n, n): one row per prompt."""
    B = rewards.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"{B} episodes do not split into groups of {group_size}")
    return masked(rewards.float(), mask).sum(1).view(B // group_size, group_size)


def _per_token(advantage: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B / n, n) sequence advantages -> the same value at every real token (B, T), twice (advantages, returns)."""
    per_token = masked(advantage.reshape(-1, 1).expand(mask.shape), mask)
    return per_token, per_token


@register_estimator("grpo", needs_critic=False, needs_groups=True, whiten=False)
def grpo(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): A_i = (R_i − mean_g R) / (std_g R + ε)
    for the n responses to one prompt. std is Bessel-corrected and ε = 1e-4, as in TRL's GRPOTrainer."""
    R = _grouped(rewards, mask, group_size)
    advantage = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)
    return _per_token(advantage, mask)


@register_estimator("dr_grpo", needs_critic=False, needs_groups=True, whiten=False)
def dr_grpo(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3): A_i = R_i − mean_g R, no division
    by the group's std (which up-weights prompts that are nearly always right or wrong). Its other half, no length
    normalisation, is `ppo.loss_agg: seq_mean_token_sum_norm`."""
    R = _grouped(rewards, mask, group_size)
    return _per_token(R - R.mean(1, keepdim=True), mask)


@register_estimator("rloo", needs_critic=False, needs_groups=True, whiten=False)
def rloo(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): each response's baseline is the mean reward of the
    other n − 1 responses to its prompt: A_i = R_i − (Σ_g R − R_i) / (n − 1) = n / (n − 1) · (R_i − mean_g R)."""
    R = _grouped(rewards, mask, group_size)
    baseline = (R.sum(1, keepdim=True) - R) / (group_size - 1)
    return _per_token(R - baseline, mask)


@register_estimator("reinforce_pp", needs_critic=False)
def reinforce_pp(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, eq. 6-8): the per-token KL stays in the reward and each token's advantage is the
    return from it on, G_t = Σ_{k≥t} γ^{k−t} r_k. The paper's global batch normalisation, (A − mean) / std over
    every token of the batch, is registered with the estimator (`whiten=True`) and done by the recipe across
    processes, since a pure per-process function cannot see the other processes' tokens."""
    rewards, mask = masked(rewards.float(), mask), mask.float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    returns = masked(returns, mask)
    return returns, returns


@register_estimator("reinforce_pp_baseline", needs_critic=False, needs_groups=True)
def reinforce_pp_baseline(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, *, gamma: float, lam: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025, §3.2): REINFORCE++ with the group's mean sequence reward subtracted first (at
    the last real token, where the score is), then the return from each token and global normalisation. The
    baseline is mean_g Σ_t r_t, so with the KL in the reward it also holds the group's mean KL, a constant per
    group (OpenRLHF subtracts the mean score only; the two differ by β · mean_g Σ KL)."""
    R = _grouped(rewards, mask, group_size)
    shifted = rewards.float().clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    shifted[rows, last_index(mask)] -= R.mean(1, keepdim=True).expand_as(R).reshape(-1)
    return reinforce_pp(shifted, values, mask, gamma=gamma, lam=lam, group_size=group_size)


def explained_variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The `masked_sums` of the returns and of the residuals returns − V: (2, 3), to be summed over
    processes before `explained_variance`."""
    return torch.stack([masked_sums(returns, mask), masked_sums(returns - values, mask)])


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor | None = None
) -> float:
    """1 − Var(returns − V) / Var(returns) over real tokens: 1 is a perfect value model, ≤ 0 useless;
    NaN when the returns are constant. `sums`: `explained_variance_sums` summed over every process
    (default: this process's own)."""
    sums = explained_variance_sums(values, returns, mask) if sums is None else sums
    (_, var_returns), (_, var_residual) = moments(sums[0]), moments(sums[1])
    if var_returns.item() < 1e-12:
        return math.nan
    return (1.0 - var_residual / var_returns).item()


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor, accelerator) -> torch.Tensor:
    """Step 5's whitening with the mean and variance of every process's tokens, not this process's
    alone: the advantages then do not depend on how the batch is split (as OpenRLHF and veRL
    whiten the whole batch). (B, R) -> (B, R), 0 on padding."""
    return masked_whiten(advantages, mask, sums=accelerator.reduce(masked_sums(advantages, mask), "sum"))


def check_estimator(estimator: Estimator, cfg: PPOStageConfig) -> None:
    """What the chosen estimator asks of the rest of the config, refused before anything loads."""
    if estimator.needs_groups and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            "rollout.samples_per_prompt",
            f"{cfg.ppo.advantage_estimator} compares responses to the same prompt: needs samples_per_prompt > 1",
        )


def whitens(estimator: Estimator, cfg: PPOStageConfig) -> bool:
    return estimator.whiten if cfg.ppo.whiten_advantages is None else cfg.ppo.whiten_advantages
