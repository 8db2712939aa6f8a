"""Where a response ends: the chat template's end-of-turn token and the set of stop tokens.

Chat models close an assistant turn with their own token, not always the tokenizer's EOS: Gemma
writes `<end_of_turn>` (EOS is `<eos>`), Llama 3 `<|eot_id|>` (`<|end_of_text|>` in some of its
tokenizer files), Qwen2.5 `<|im_end|>` (EOS in the Instruct tokenizers, not in the base ones).
A sampler that stops only at EOS never stops on those; the missing-EOS penalty then hits every
response and the reward model is read at a token it never saw. So:

- `end_of_turn_id`: the token the template writes right after an assistant message, found by
  rendering one; what the reward model and DPO are trained on after each answer;
- `stop_token_ids`: every token that ends a response: the end of turn, EOS, and the ids of the
  model's generation_config.json (Llama 3.1's [128001, 128008, 128009], Qwen2.5's
  [151645, 151643]), as `model.generate` stops for a user of plain transformers.

The registry writes the set into each built model's `generation_config.eos_token_id`
(rlhf/registry/models.py), so sampling, PPO's masks and a saved model read the same set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from jinja2 import TemplateError
from transformers import GenerationConfig, PreTrainedTokenizerBase

log = logging.getLogger("rlhf.registry")

# The assistant text rendered to find what the template writes after it: no spaces, so templates
# that trim the content (Gemma, Llama 3, Mistral) leave it whole.
_PROBE = "RLHFPROBE7"


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The first special or added token the chat template writes after an assistant message's
    content (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, EOS itself); EOS when the template writes
    none there or cannot render a user + assistant exchange."""
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError) as e:  # a template's own raise_exception, a missing variable
        log.warning("chat template cannot render a user + assistant exchange (%s); turns end at EOS", e)
        return tokenizer.eos_token_id
    if _PROBE not in text:
        return tokenizer.eos_token_id
    after = tokenizer(text[text.rindex(_PROBE) + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    marked = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((i for i in after if i in marked), tokenizer.eos_token_id)


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None
) -> tuple[int, ...]:
    """Every token id that ends a response: the template's end of turn first, then EOS, then the
    generation config's own EOS ids, without repeats."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    ids += _as_list(getattr(generation_config, "eos_token_id", None))
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
