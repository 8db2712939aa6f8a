"""One PPO iteration's experience, as a named container (no positional tuples).

Shapes: B episodes (prompts), P prompt tokens (left-padded), R response tokens (right-padded
with pad after EOS). The attention mask covers the real prompt tokens and the response up to and
including its EOS."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) prompt then response
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, R) fp32, the policy that sampled the response
    ref_logprobs: torch.Tensor  # (B, R) fp32, the frozen reference
    values: torch.Tensor  # (B, R) fp32, V(s_t) before each response token
    scores: torch.Tensor  # (B,) sequence scores after normalisation
    rewards: torch.Tensor  # (B, R) −β·KL per token + score at the last token
    advantages: torch.Tensor  # (B, R) GAE, whitened
    returns: torch.Tensor  # (B, R) advantages (before whitening) + values

    def select(self, index: torch.Tensor) -> Rollout:
        """The episodes at `index` (a minibatch)."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask (B, R) is 1 up to and including the first EOS (everything, if the
    response was cut off at max_new_tokens); has_eos (B,) says whether an EOS was emitted."""
    is_eos = response_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    R = response_ids.shape[1]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, R - 1, dtype=torch.long))
    positions = torch.arange(R, device=response_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), has_eos
