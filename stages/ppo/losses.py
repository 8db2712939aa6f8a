"""PPO's losses and the log-prob / entropy of sampled tokens, as pure functions in fp32 (callers
may pass bf16 logits). Shapes: B sequences, T response tokens, V vocabulary; `mask` (B, T) is 1
on response tokens up to and including EOS."""

from __future__ import annotations

import torch

from stages.ppo.masked import masked, masked_mean


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


# each aggregation -> the entry of `loss_counts` it divides by
LOSS_AGGREGATIONS = {"token_mean": 0, "seq_mean_token_mean": 1, "seq_mean_token_sum_norm": 2}


def loss_counts(mask: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """What `aggregate_loss` divides by, as counts that add up over the parts of a batch: (tokens,
    sequences with at least one token, sequences · max_len). mask (B, T) -> (3,) fp32. Summed over
    a minibatch's micro-batches and processes they give every part the minibatch's denominator."""
    mask = mask.bool()
    rows = torch.tensor(float(mask.shape[0] * (max_len or 0)), device=mask.device)
    return torch.stack([mask.sum().float(), mask.any(1).sum().float(), rows])


def aggregate_loss(
    x: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """A per-token loss x (B, T) reduced to a scalar over the real tokens (`ppo.loss_agg`):
    token_mean               Σ_bt x / Σ_bt 1: every token weighs the same (DAPO, Yu et al. 2025, §3.3)
    seq_mean_token_mean      Σ over sequences of each one's token mean / their number (GRPO's 1/|o_i|);
                             sequences with no real token (masked out) do not count
    seq_mean_token_sum_norm  Σ_bt x / (B · max_len): each sequence's token sum over a constant, so a long
                             response is not down-weighted (Dr. GRPO, Liu et al. 2025, eq. 3; max_len =
                             rollout.generation.max_new_tokens)
    `counts`: the `loss_counts` of the whole batch this one is a part of (a micro-batch of a minibatch
    spread over accumulation steps and processes): the sums here are divided by the whole's counts, so
    a token (or sequence) weighs the same wherever it sits, as DAPO's eq. 8 and TRL's
    `num_items_in_batch` divide by the minibatch's count. None: this batch's own."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {tuple(LOSS_AGGREGATIONS)}")
    if mode == "seq_mean_token_sum_norm" and not max_len:
        raise ValueError("seq_mean_token_sum_norm needs max_len, the constant each sequence's sum is divided by")
    counts = loss_counts(mask, max_len) if counts is None else counts
    denominator = counts[LOSS_AGGREGATIONS[mode]].to(torch.float32).clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        return masked_mean(x, mask.to(x.dtype), dim=1).sum() / denominator  # an empty row's mean is 0
    return masked(x, mask).sum() / denominator


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    *,
    clip_range_high: float | None = None,
    agg: str = "token_mean",
    max_len: int | None = None,
    weights: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7; seed 003), as a loss to minimise:
      L = −agg_t min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t),  ρ_t = exp(log π(a_t) − log π_old(a_t)),
    ε_low = clip_range, ε_high = clip_range_high (default: the same; DAPO's "clip-higher" raises it, Yu et al.
    2025 §3.1) and agg from `aggregate_loss` (default: the token mean). `weights` (B, T), if given, multiply each
    token's term before the aggregation: truncated importance sampling's min(π_old / π_sampler, C) (Yao et al.
    2025). `counts`: the whole minibatch's `loss_counts` (see `aggregate_loss`). Returns the loss and stats: clip
    fraction and approximate KL(old ‖ new) (k3).

    The tokens were sampled from the old policy, so KL(old ‖ new) = E_old[−r] with r = log π − log π_old,
    and its k3 estimator (Schulman 2020, with the log-ratio log π_old − log π = −r) is
    e^{r} − 1 − r: unbiased under the old policy and ≥ 0 (tests/test_ppo_math.py checks it exactly)."""
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    if weights is not None:  # per-token importance weights (rollout.importance_correction: tis), no gradient
        per_token = per_token * weights
    loss = aggregate_loss(per_token, mask, agg, max_len, counts)
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
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·(V − return)² (seed 003), with the new prediction clipped to ±c of the rollout's as in
    PPO2's baselines: L = ½·mean_t max((V − R)², (V_clip − R)²), a token mean (over the whole
    minibatch's tokens with `counts`, see `aggregate_loss`). (B, T) inputs -> scalar."""
    values = values.float()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * aggregate_loss(unclipped, mask, "token_mean", counts=counts)
        return loss, {"clipfrac": torch.zeros((), device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), mask, "token_mean", counts=counts)
    return loss, {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach()}
