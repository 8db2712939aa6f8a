"""Batched generation from chat prompts: left-padded, KV-cached, greedy or sampled (seeds 003, 004).

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`), exactly
as a user would with plain transformers, so what we evaluate is what they get.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt, ending with the assistant's turn marker."""
    texts = tokenizer.apply_chat_template(list(prompts), tokenize=False, add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left so generation appends on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def sampling_kwargs(gen: GenerationConfig) -> dict:
    if not gen.do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        "do_sample": True,
        "temperature": gen.temperature,
        "top_k": gen.top_k or None,
        "top_p": gen.top_p if gen.top_p < 1.0 else None,
    }


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    gen: GenerationConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_ids, response_ids): (B, P) left-padded and (B, R) right-padded with pad after EOS."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        # Weights here are always whole on this process (gathered once under ZeRO-3, see
        # gathered_for_generation), so processes need not step in lockstep.
        synced_gpus=False,
        **sampling_kwargs(gen),
    )
    return ids, out[:, ids.shape[1] :]


def generate_text(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    gen: GenerationConfig,
    batch_size: int = 128,
) -> list[str]:
    """The response text to each chat prompt (special tokens removed)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = render_prompts(tokenizer, prompts[start : start + batch_size])
            _, responses = generate_ids(model, tokenizer, rows, gen)
            out += tokenizer.batch_decode(responses, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module, accelerator):
    """Under DeepSpeed ZeRO-3, gather the sharded parameters once for a whole rollout and lift
    the per-module gather hooks meanwhile (DeepSpeed's own helper), instead of gathering every
    layer at every generated token. Elsewhere, just yield the unwrapped model."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield unwrapped
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(model):  # `model` is the DeepSpeedEngine
        yield unwrapped
