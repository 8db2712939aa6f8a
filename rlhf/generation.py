"""Batched generation from chat prompts: left-padded, KV-cached, greedy or sampled (seeds 003, 004).

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`), exactly
as a user would with plain transformers, so what we evaluate is what they get. Generation stops
at any of the model's stop tokens, EOS and the template's end of turn (rlhf/registry/turns.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.distributed import is_zero3
from rlhf.registry import stop_token_ids


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


# Decoding settings a model's own generation_config.json may carry (Qwen2.5-Instruct ships
# repetition_penalty=1.1, top_k=20, top_p=0.8, temperature=0.7), which transformers applies to every
# generate() call that does not set them. All are switched off here, so what is generated is exactly
# softmax(logits / temperature) truncated only as our GenerationConfig says (greedy: its argmax):
# PPO's log-probs must be those of the policy that sampled, and evaluation must decode as configured.
NEUTRAL_DECODING = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "typical_p": 1.0,
    "min_p": None,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
}


def sampling_kwargs(gen: GenerationConfig) -> dict:
    """generate() keyword arguments for `gen`, with every other decoding setting switched off."""
    if not gen.do_sample:
        return {**NEUTRAL_DECODING, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        **NEUTRAL_DECODING,
        "do_sample": True,
        "temperature": gen.temperature,
        "top_k": gen.top_k or None,
        "top_p": gen.top_p if gen.top_p < 1.0 else None,
    }


class SampledLogprobs(LogitsProcessor):
    """Records log p(token) of every generated token under softmax(logits / temperature) over the
    whole vocabulary, in fp32: what a forward of the policy gives, and what PPO's ratio compares
    against. transformers runs a caller's processors after its own (all switched off here, see
    NEUTRAL_DECODING) and before the sampling warpers (temperature, top-k, top-p), so `scores` are
    the raw logits (tests/test_generation.py checks this against a forward). At each step the
    token drawn at the step before is the last of `input_ids`, so one step's log-softmax is kept
    and the final token is read in `finish`."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V)
        self.logprobs: list[torch.Tensor] = []  # R - 1 entries of (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """(B, R) log-probs of `response`, the tokens generate() returned."""
        last = self.previous.gather(-1, response[:, -1:]).squeeze(-1)
        return torch.stack([*self.logprobs, last], dim=1)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    gen: GenerationConfig,
    with_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(prompt_ids, response_ids, logprobs): (B, P) left-padded, (B, R) right-padded with pad after
    the stop token, and with `with_logprobs` (else None) the (B, R) fp32 log-probs of the response
    tokens under softmax(logits / temperature) (positions after the stop hold the pad's log-prob:
    mask them). Stops at any of `stop_token_ids(tokenizer, model.generation_config)`."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    recorder = SampledLogprobs(gen.temperature if gen.do_sample else 1.0) if with_logprobs else None
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(stop_token_ids(tokenizer, getattr(model, "generation_config", None))),
        use_cache=True,
        # Weights here are always whole on this process (gathered once under ZeRO-3, see
        # gathered_for_generation), so processes need not step in lockstep.
        synced_gpus=False,
        logits_processor=LogitsProcessorList([recorder] if recorder else []),
        **sampling_kwargs(gen),
    )
    response = out[:, ids.shape[1] :]
    return ids, response, recorder.finish(response) if recorder else None


def ended_at(response_ids: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ended, length) of each response: ended (B,) bool, whether it holds a stop token; length (B,)
    its tokens up to and including the first stop (R if it has none: cut off at max_new_tokens)."""
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_ids), device=response_ids.device))  # (B, R)
    ended = is_stop.any(dim=1)
    R = response_ids.shape[1]
    first = torch.where(ended, is_stop.int().argmax(dim=1), torch.full_like(ended, R - 1, dtype=torch.long))
    return ended, first + 1


def response_texts(
    tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, stop_ids: Sequence[int]
) -> list[str]:
    """The text of each response before its first stop token (the stop, and the pads after it, left
    out even where the stop is not a special token), special tokens removed. For transformers'
    generate, which pads a row only after its stop; an engine's rows: `decode_responses`."""
    ended, length = ended_at(response_ids, stop_ids)
    return decode_responses(tokenizer, response_ids, length, ended)


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor
) -> list[str]:
    """The text of each response's first `lengths` tokens, less its stop token where it `ended`
    there, special tokens removed. (B, R), (B,), (B,) -> B strings."""
    rows = [
        row[: n - 1 if e else n]
        for row, n, e in zip(response_ids.tolist(), lengths.tolist(), ended.tolist(), strict=True)
    ]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    gen: GenerationConfig,
    batch_size: int = 128,
) -> tuple[list[str], list[bool], list[list[int]]]:
    """(texts, ended, sequences): the response text to each chat prompt (special tokens removed),
    whether it ended with a stop token (False: cut off at gen.max_new_tokens), and the token ids of
    prompt + response up to and including its stop (all of it if cut off): what a PPO rollout's
    reward model reads, with nothing decoded, re-tokenised or appended."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    texts: list[str] = []
    ended: list[bool] = []
    sequences: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    try:  # a bar where there is more than one batch: held-out evaluation, labelling, mining
        for start in tqdm(starts, desc="generating", unit="batch", disable=len(starts) < 2, leave=False):
            rows = render_prompts(tokenizer, prompts[start : start + batch_size])
            _, responses, _ = generate_ids(model, tokenizer, rows, gen)
            texts += response_texts(tokenizer, responses, stops)
            stopped, length = ended_at(responses, stops)
            ended += stopped.tolist()
            sequences += [p + r[:n] for p, r, n in zip(rows, responses.tolist(), length.tolist(), strict=True)]
    finally:
        model.train(was_training)
    return texts, ended, sequences


def generate_text(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    gen: GenerationConfig,
    batch_size: int = 128,
) -> list[str]:
    """The response text to each chat prompt (special tokens removed)."""
    return generate_answers(model, tokenizer, prompts, gen, batch_size)[0]


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module, accelerator, part: str | None = None):
    """Under DeepSpeed ZeRO-3, gather the sharded parameters once for a whole rollout and lift
    the per-module gather hooks meanwhile (as DeepSpeed's `unwrap_model_for_generation` does),
    instead of gathering every layer at every generated token. `part`: the attribute of the
    unwrapped model that generates (PPO's `policy`): only its parameters are gathered, not the value
    model's beside it (at Qwen2.5-0.5B's shape in fp32, 1 GB less a process with two processes).
    Elsewhere, just yield the unwrapped model."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_zero3(accelerator):
        yield unwrapped
        return
    import deepspeed  # optional: only a ZeRO-3 run gets here

    offload = getattr(model.optimizer, "parameter_offload", model.optimizer)  # `model`: the DeepSpeedEngine
    params = list((getattr(unwrapped, part) if part else unwrapped).parameters())
    with deepspeed.zero.GatheredParameters(params):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield unwrapped
        finally:
            offload._register_deepspeed_module(offload.module)
