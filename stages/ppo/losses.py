"""PPO's losses and the log-prob / entropy of sampled tokens, as pure functions in fp32 (callers
may pass bf16 logits). Shapes: B sequences, T response tokens, V vocabulary; `mask` (B, T) is 1
on response tokens up to and including EOS."""

from __future__ import annotations

import torch

from stages.ppo.masked import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits). logits (B, T, V), tokens (B, T) -> (B, T), fp32.

    Computed as logit[token] − logsumexp(logits), which never materialises a (B, T, V)
    log-softmax: the difference matters at real vocabulary sizes."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(l) − Σ softmax(l)·l. (B, T, V) -> (B, T)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7; seed 003), as a loss to minimise:
      L = −mean_t min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t),  ρ_t = exp(log π(a_t) − log π_old(a_t)).
    Returns the token-mean loss and stats: clip fraction and approximate KL(old ‖ new) (k3).

    The tokens were sampled from the old policy, so KL(old ‖ new) = E_old[−r] with r = log π − log π_old,
    and its k3 estimator (Schulman 2020, with the log-ratio log π_old − log π = −r) is
    e^{r} − 1 − r: unbiased under the old policy and ≥ 0 (tests/test_ppo_math.py checks it exactly)."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·(V − return)² (seed 003), with the new prediction clipped to ±c of the rollout's as in
    PPO2's baselines: L = ½·mean_t max((V − R)², (V_clip − R)²). (B, T) inputs -> scalar."""
    values = values.float()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, {"clipfrac": torch.zeros((), device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}
