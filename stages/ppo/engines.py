"""Rollout engines: what samples the policy's responses in step 1 of PPO.

An engine takes token ids of chat prompts and the sampling settings, and returns the prompts
left-padded, the responses right-padded, and (when asked) each sampled token's log-prob under
softmax(logits / temperature). After every optimizer phase the recipe calls
`update_weights(model)` so that the engine samples from the policy it is training; an engine
that shares the trainer's weights has nothing to do there, one that holds its own copy (vLLM)
copies them in. Before the optimizer phase it calls `sleep()`: an engine holding GPU memory of its
own gives it back to the trainer meanwhile. At the end of the run it calls `close()`. Engines
register in `ENGINES` by name and are chosen by `rollout.engine` (`auto`: `resolve_engine`).

Both engines stop a response at the same token ids: `rlhf.registry.stop_token_ids`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig, RolloutConfig
from rlhf.generation import ended_at, gathered_for_generation, generate_ids
from rlhf.precision import Precision
from rlhf.registry import stop_token_ids
from stages.ppo.rollout import Generated
from stages.ppo.vllm_engine import VLLMEngine, vllm_available

log = logging.getLogger("rlhf.ppo")


class RolloutEngine(Protocol):
    # whether the engine samples from a copy of the weights of its own (with its own kernels): its
    # log-probs then differ a little from the trainer's forward, which is run for the rollout's
    own_weights: bool

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, with_logprobs: bool
    ) -> Generated: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...

    def sleep(self) -> None: ...

    def close(self) -> None: ...


class HFEngine:
    """Sampling with transformers' KV-cached `generate` on the policy being trained (no copy of
    the weights: `update_weights` has nothing to do). Under DeepSpeed ZeRO-3 the sharded weights
    are gathered once for the whole batch, not once per token (rlhf/generation.py)."""

    own_weights = False

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, accelerator, *_settings):
        # *_settings: the precision and rollout config every builder is handed; generate needs neither
        self.model, self.tokenizer, self.accelerator = model, tokenizer, accelerator

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, with_logprobs: bool) -> Generated:
        with gathered_for_generation(self.model, self.accelerator, "policy") as unwrapped, self.accelerator.autocast():
            unwrapped.eval()
            try:
                query, response, logprobs = generate_ids(
                    unwrapped.policy, self.tokenizer, prompt_ids, gen, with_logprobs
                )
            finally:
                unwrapped.train()
        # transformers' generate pads a row only after it stopped, so its first stop token is where it ended
        ended, lengths = ended_at(response, stop_token_ids(self.tokenizer, unwrapped.policy.generation_config))
        return Generated(prompt_ids=query, response_ids=response, logprobs=logprobs, lengths=lengths, ended=ended)

    def update_weights(self, model: torch.nn.Module) -> None:
        pass  # samples from the trained module itself

    def sleep(self) -> None:
        pass  # holds nothing of its own

    def close(self) -> None:
        pass  # holds nothing of its own


def _vllm(model, tokenizer, accelerator, precision: Precision, rollout: RolloutConfig) -> VLLMEngine:
    return VLLMEngine(
        model,
        tokenizer,
        accelerator,
        precision,
        gpu_memory=rollout.vllm_gpu_memory,
        tensor_parallel=rollout.vllm_tensor_parallel,
    )


# name -> builder(model, tokenizer, accelerator, precision, rollout config); `rollout.engine` picks one.
ENGINES: dict[str, Callable[..., RolloutEngine]] = {"hf": HFEngine, "vllm": _vllm}


def resolve_engine(name: str, precision: Precision) -> str:
    """`rollout.engine`, with `auto` decided: vLLM when it is installed and the models run on a
    GPU; else transformers' generate: on a CPU vLLM samples 2-2.8x faster at 256 new tokens
    (docs/benchmarks.md), but it is a second environment and a second copy of the weights, and the
    tiny default's 8-token responses leave it little to win; `rollout.engine: vllm` asks for it."""
    if name != "auto":
        return name
    picked = "vllm" if precision.cuda and vllm_available() else "hf"
    installed = "installed" if vllm_available() else "not installed"
    log.info("rollout.engine auto -> %s (%s, vllm %s)", picked, "GPU" if precision.cuda else "CPU", installed)
    return picked


def build_engine(
    name: str,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    accelerator,
    precision: Precision,
    rollout: RolloutConfig,
) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, accelerator, precision, rollout)
