"""The reward model's loss: the pairwise (Bradley-Terry) loss of InstructGPT (Ouyang et al. 2022,
eq. 1), with the optional margin of Llama 2 (Touvron et al. 2023, eq. 2) and the optional
centering term of Eisenstein et al. (2023), and the optional language-model loss on the chosen
responses that regularises the body (Yang et al. 2024)."""

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


def response_lm_loss(logits: torch.Tensor, labels: torch.Tensor, response_start: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens.

    logits: (B, T, V) at every position. labels: (B, T) token ids, -100 at padding.
    response_start: (B,) index of each row's first response token (its prompt length).
    Token t is predicted from the logits at t - 1 and counts when t >= response_start.
    Returns a scalar: the mean over all counted tokens of the batch (0 when none is left, as
    when truncation cut every response).
    """
    targets = labels[:, 1:].clone()  # (B, T-1): the token each position predicts
    positions = torch.arange(1, labels.shape[1], device=labels.device)  # (T-1,)
    targets[positions.unsqueeze(0) < response_start.unsqueeze(1)] = -100  # prompt tokens
    if not (targets != -100).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) without a NaN
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
