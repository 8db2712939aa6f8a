"""Rollout engines: what samples the policy's responses in step 1 of PPO.

An engine takes token ids of chat prompts and the sampling settings, and returns the prompts
left-padded, the responses right-padded, and (when asked) each sampled token's log-prob under
softmax(logits / temperature). After every optimizer phase the recipe calls
`update_weights(model)` so that the engine samples from the policy it is training; an engine
that shares the trainer's weights has nothing to do there, one that holds its own copy (vLLM)
copies them in. Engines register in `ENGINES` by name and are chosen by `rollout.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.generation import gathered_for_generation, generate_ids


@dataclass
class Generated:
    """One batch of sampled responses. B prompts, P prompt tokens, R response tokens."""

    prompt_ids: torch.Tensor  # (B, P) left-padded with the pad id
    response_ids: torch.Tensor  # (B, R) right-padded with the pad id after EOS
    logprobs: torch.Tensor | None  # (B, R) fp32 log-probs of the sampled tokens, or None if not asked


class RolloutEngine(Protocol):
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, with_logprobs: bool
    ) -> Generated: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...


class HFEngine:
    """Sampling with transformers' KV-cached `generate` on the policy being trained (no copy of
    the weights: `update_weights` has nothing to do). Under DeepSpeed ZeRO-3 the sharded weights
    are gathered once for the whole batch, not once per token (rlhf/generation.py)."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, accelerator):
        self.model, self.tokenizer, self.accelerator = model, tokenizer, accelerator

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, with_logprobs: bool) -> Generated:
        with gathered_for_generation(self.model, self.accelerator) as unwrapped, self.accelerator.autocast():
            unwrapped.eval()
            try:
                query, response, logprobs = generate_ids(
                    unwrapped.policy, self.tokenizer, prompt_ids, gen, with_logprobs
                )
            finally:
                unwrapped.train()
        return Generated(prompt_ids=query, response_ids=response, logprobs=logprobs)

    def update_weights(self, model: torch.nn.Module) -> None:
        pass  # samples from the trained module itself


# name -> builder(model, tokenizer, accelerator); `rollout.engine` picks one.
ENGINES: dict[str, Callable[..., RolloutEngine]] = {"hf": HFEngine}


def build_engine(name: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, accelerator) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, accelerator)
