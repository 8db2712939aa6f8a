"""KL(policy ‖ ref): per-token estimators, the KL-penalised per-token rewards, and the fixed or
adaptive coefficient β. Shapes: B sequences, T response tokens; mask (B, T) marks real tokens."""

from __future__ import annotations

import torch

from stages.ppo.masked import last_index, masked


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ ref) from tokens sampled from the policy (Schulman,
    "Approximating KL divergence", 2020). With r = log p_policy − log p_ref:
      k1 = r                (unbiased, high variance, can be negative per token)
      k2 = r² / 2           (biased, low variance, ≥ 0)
      k3 = (e^{−r} − 1) + r (unbiased, low variance, ≥ 0)
    Unbiased means E_policy[k] = KL(policy ‖ ref) when the tokens come from the policy; for
    KL(old ‖ new) from the old policy's tokens the sign of r flips (losses.policy_loss's approx_kl).
    Shapes (B, T) -> (B, T)."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (InstructGPT; Ziegler et al. 2019): −β·KL at every response token, plus
    the sequence score at the last real response token (its EOS, or the last token if cut off).
    scores (B,), kl (B, T), mask (B, T) -> (B, T)."""
    rewards = masked(-kl_coef * kl.float(), mask)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores.float()
    return rewards


class KLController:
    """β, the weight of the KL penalty: held constant (`target` None), or moved toward a target KL
    per sequence (Ziegler et al. 2019, eq. 2):
    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon), n = episodes this step."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
