"""The reward model's loss: the pairwise (Bradley-Terry) loss of InstructGPT (Ouyang et al. 2022,
eq. 1), with the optional margin of Llama 2 (Touvron et al. 2023, eq. 2) and the optional
centering term of Eisenstein et al. (2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """L = mean(−log σ(r_chosen − r_rejected − m)) + c · mean((r_chosen + r_rejected)²).

    chosen_rewards, rejected_rewards: (B,) one scalar per pair.
    margin: (B,) or None; how much better chosen must score (0 when None).
    center_coef: c, or None for no centering term.
    Returns a scalar. logsigmoid keeps it finite for large reward gaps.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def pair_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs the model orders correctly (ties count as wrong). Shapes (B,) -> scalar."""
    return (chosen_rewards > rejected_rewards).float().mean()
