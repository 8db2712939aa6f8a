"""Statistics over the real tokens of padded (B, T) tensors; `mask` is 1 on real tokens.

Whitening and the value statistics must be the same whichever process holds which episodes, so
the global versions are built from sums: `masked_sums` per process, summed across processes by
the caller (an all-reduce), then `moments` — a pure function of the summed numbers."""

from __future__ import annotations

import torch


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
