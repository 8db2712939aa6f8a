"""PPO's pure math, in one module beside the advantage estimators (advantages.py), as veRL keeps
its `core_algos.py`: pure functions on tensors with documented shapes, each tested against a value
worked out by hand (tests/test_ppo_math.py). Shapes: B sequences, T response tokens, V vocabulary;
`mask` (B, T) is 1 on real response tokens (up to and including EOS). Three parts:

1. Masked statistics over the real tokens of padded (B, T) tensors. Whitening and the value
   statistics must be the same whichever process holds which episodes, so the global versions are
   built from sums: `masked_sums` per process, summed across processes by the caller (an
   all-reduce), then `moments` — a pure function of the summed numbers.
2. KL(policy ‖ ref): per-token estimators, the KL-penalised per-token rewards, the fixed or
   adaptive coefficient β, and the running moments of the scores (`reward.normalize: running`).
3. The losses and the log-prob / entropy of sampled tokens, in fp32 (callers may pass bf16
   logits). Policy losses are a registry, `POLICY_LOSSES`, chosen by `ppo.policy_loss`: outside
   code adds one with `@register_policy_loss("name")` (veRL's `register_policy_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.config import ConfigError

# ------------------------------------------------------------------------------------------------
# 1. Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1 (over `dim`, or everything). Empty masks give 0, not NaN.
    Masked-out entries are selected away, not multiplied by 0: an inf or NaN there (a pad's
    log-prob, say) would otherwise turn the mean into NaN."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    mask = mask.to(x.dtype)
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1.0)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, else 0, by selection: x · mask would turn an inf or NaN at a masked-out
    position (k3 of a pad's log-prob overflows) into NaN. (B, T) -> (B, T)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1 (Bessel-corrected when unbiased and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, Σx, Σx²) over the entries where mask is 1, in fp64 so that summing them over processes
    and subtracting squares loses nothing that matters. (B, T) -> (3,)"""
    kept = torch.where(mask.bool(), x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    return torch.stack([mask.bool().sum().double(), kept.sum(), (kept * kept).sum()])


def moments(sums: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) from `masked_sums` (summed over every process): mean = Σx / n,
    var = (Σx² − n·mean²) / (n − 1) (or / n). Empty: (0, 0)."""
    n, total, total_sq = sums.unbind(-1)
    mean = total / n.clamp(min=1.0)
    var = (total_sq - n * mean * mean).clamp(min=0.0)
    denominator = n - 1 if unbiased else n
    return mean, var / denominator.clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sums: torch.Tensor | None = None
) -> torch.Tensor:
    """(x − mean) / std over the masked entries; masked-out entries come back as 0. `sums`: the
    `masked_sums` of the whole batch across processes (default: this tensor's own)."""
    mean, var = moments(masked_sums(x, mask) if sums is None else sums)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask (B, T) -> (B,); 0 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


# ------------------------------------------------------------------------------------------------
# 2. KL(policy ‖ ref)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ ref) from tokens sampled from the policy (Schulman,
    "Approximating KL divergence", 2020). With r = log p_policy − log p_ref:
      k1 = r                (unbiased, high variance, can be negative per token)
      k2 = r² / 2           (biased, low variance, ≥ 0)
      k3 = (e^{−r} − 1) + r (unbiased, low variance, ≥ 0)
    Unbiased means E_policy[k] = KL(policy ‖ ref) when the tokens come from the policy; for
    KL(old ‖ new) from the old policy's tokens the sign of r flips (`policy_loss`'s approx_kl).
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


class RunningMoments:
    """Mean and std of every score seen so far (Chan et al.'s parallel update), for `normalize: running`."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


# ------------------------------------------------------------------------------------------------
# 3. Losses


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


# name -> policy loss, filled by @register_policy_loss (and by outside code, before the run starts). The contract,
# `policy_loss`'s: fn(logprobs, old_logprobs, advantages, mask, clip_range, *, clip_range_high, agg, max_len,
# weights, counts) -> (loss, {"clipfrac", "approx_kl", "ratio"}), all (B, T) in, scalars out.
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the policy loss `name`; `ppo.policy_loss: name` picks it.
    A name taken already is refused, so that a plug-in never silently replaces a built-in."""

    def register(fn: Callable) -> Callable:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered already ({POLICY_LOSSES[name].__qualname__})")
        POLICY_LOSSES[name] = fn
        return fn

    return register


def get_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The policy loss registered as `name`; an unknown one is refused in one line naming the known ones."""
    if name not in POLICY_LOSSES:
        raise ConfigError("ppo.policy_loss", f"unknown {name!r}; known: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


@register_policy_loss("clip")
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
