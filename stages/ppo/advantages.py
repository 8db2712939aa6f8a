"""Advantage estimators and how well the value model explains the returns.

An estimator is a pure function `(rewards, values, mask, cfg) -> (advantages, returns)` on (B, T)
tensors, registered in `ESTIMATORS` with whether it needs a critic; `ppo.advantage_estimator`
picks one. When the chosen estimator needs no critic, the recipe builds no value model and
`values` is None."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.ppo.masked import masked_sums, moments


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), per token, backwards:
      δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t,
    with V = 0 past the last real token (the episode ends at EOS). rewards, values, mask (B, T)
    -> advantages (B, T), returns (B, T); both 0 on padding."""
    rewards, values, mask = rewards.float(), values.float() * mask, mask.float()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


def gae_estimator(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` as a registered estimator (it needs the critic's values)."""
    if values is None:
        raise ValueError("the gae estimator needs the value model's values")
    return gae(rewards, values, mask, gamma, lam)


@dataclass(frozen=True)
class Estimator:
    """fn(rewards (B, T), values (B, T) | None, mask (B, T), gamma, lam) -> advantages, returns (B, T)."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool  # False: no value model is built, loaded, trained or saved


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae_estimator, needs_critic=True),
}


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
