"""One PPO iteration's experience, as a named container (no positional tuples).

Shapes: B episodes (prompts × rollout.samples_per_prompt, a prompt's responses adjacent), P prompt
tokens (left-padded), R response tokens (right-padded with pad after EOS). The attention mask
covers the real prompt tokens and the response up to and including its EOS. "EOS" here is any
stop token: EOS or the chat template's end of turn (rlhf/registry/turns.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Generated:
    """One batch of sampled responses, as a rollout engine returns it (stages/ppo/engines.py).
    B prompts, P prompt tokens, R response tokens."""

    prompt_ids: torch.Tensor  # (B, P) left-padded with the pad id
    response_ids: torch.Tensor  # (B, R) right-padded with the pad id after EOS
    logprobs: torch.Tensor | None  # (B, R) fp32 log-probs of the sampled tokens, or None if not asked
    # what the engine says of each row, never read off the padding (a pad id may also be a stop id):
    lengths: torch.Tensor  # (B,) long, the response's tokens up to and including its stop token
    ended: (
        torch.Tensor
    )  # (B,) bool, it stopped at a stop token (False: cut off at max_new_tokens or the model's length)

    def to(self, device: torch.device) -> Generated:
        """Every tensor on `device` (no copy where it is there already)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Generated(**{name: None if t is None else t.to(device) for name, t in moved.items()})


@dataclass(kw_only=True)
class Rollout:
    """Built by keyword only: `Rollout(logprobs=…, ref_logprobs=…)`, so a swap cannot be written
    silently. `values` and `returns` are None when the advantage estimator needs no critic."""

    input_ids: torch.Tensor  # (B, P + R) prompt then response
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    loss_mask: torch.Tensor  # (B, R) the tokens the losses see: response_mask, less cut-off ones (ppo.mask_truncated)
    logprobs: torch.Tensor  # (B, R) fp32, the policy that sampled the response
    ref_logprobs: torch.Tensor  # (B, R) fp32, the frozen reference
    # (B, R) fp32, the rollout engine's own (for TIS and rollout/logprob_diff_*); None if not asked for
    engine_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None  # (B, R) fp32, V(s_t) before each response token; None without a critic
    kl: torch.Tensor  # (B, R) fp32, the per-token KL estimate (in the reward unless ppo.kl_in: loss; 0 on padding)
    scores: torch.Tensor  # (B,) sequence scores after normalisation
    rewards: torch.Tensor  # (B, R) −β·KL per token (kl_in: reward) + score at the last token
    advantages: torch.Tensor  # (B, R) from the advantage estimator, whitened if configured
    returns: torch.Tensor | None  # (B, R) the value model's targets; None without a critic

    def select(self, index: torch.Tensor) -> Rollout:
        """The episodes at `index` (a minibatch)."""
        return Rollout(**{f.name: _rows(getattr(self, f.name), index) for f in fields(self)})


@dataclass(kw_only=True)
class Scored:
    """What step 3 said of each episode, kept for the step's metrics and sample table."""

    raw_scores: torch.Tensor  # (B,) the combined score before normalisation
    # reward source name -> (B,) its score before weighting (+ "overlong", the overlong penalty, if on);
    # each logged as train/reward/<name>
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    gold_scores: torch.Tensor | None = None  # (B,) the task's checker (1/0, NaN without an answer); never in the score
    has_eos: torch.Tensor  # (B,) bool, whether the response emitted EOS
    questions: list[str]  # the prompts' last user message
    texts: list[str]  # the decoded responses


def _rows(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[index]


def response_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width): 1 on each response's first `lengths` tokens (up to and including its stop token,
    EOS or the template's end of turn; all of it if cut off), 0 on the padding after."""
    positions = torch.arange(width, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).long()


def in_micro_batches(fn: Callable, size: int | None, *rows: torch.Tensor):
    """fn(*rows) computed on `size` rows at a time (None: all at once), its outputs (a tensor, None,
    or a tuple of them, each (B, ...)) concatenated back along the rows. For the rollout's no-grad
    forwards: a forward's activations and fp32 full-vocabulary logits then exist for `size` rows at a
    time; each row is computed as in the whole batch (same padding and width), so the result is too."""
    B = rows[0].shape[0]
    if size is None or size >= B:
        return fn(*rows)
    parts = [fn(*(t[i : i + size] for t in rows)) for i in range(0, B, size)]
    if not isinstance(parts[0], tuple):
        return _cat(parts)
    return tuple(_cat([p[k] for p in parts]) for k in range(len(parts[0])))


def _cat(parts: list) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)
