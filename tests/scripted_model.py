"""A real decoder whose next token is set by hand: what a test needs to make generation emit an
exact sequence (an answer, then an end-of-turn token, or no end at all) with no training.

The registry's test-sized Mistral (untied output layer, hidden size 32) with every attention and
MLP output projection zeroed, so the residual stream is the input embedding alone and the next
token depends on the last one only: a bigram table. State k's token embeds as the unit vector e_k;
RMSNorm scales it to √32·e_k ≈ 5.66·e_k, and the output row of the next token holds 10 at k: its
logit is 56.6, every other one 0, so greedy picks it and sampling at temperature 1 misses it with
probability below 600·e^-56.6 ≈ 1e-22. Everything else (generate, the KV cache, the stop tokens the
registry writes into generation_config) is the real code path.
"""

from __future__ import annotations

import torch

from rlhf.config import ModelInit
from rlhf.registry import build_policy, prepare_tokenizer, resolve
from rlhf.registry.tiny import EOS, build_tiny_tokenizer

END_OF_TURN = "<end_of_turn>"

# The tiny template with Gemma's shape: an assistant turn ends with <end_of_turn>, not with EOS.
TEMPLATE_WITH_END_OF_TURN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{{ message['content'] }}<end_of_turn>"
    "{%- else -%}"
    "<|user|>{{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def tokenizer_with_end_of_turn():
    """The tiny tokenizer plus a special <end_of_turn> token that its template closes turns with;
    EOS stays <|end|>, as Gemma's tokenizer keeps <eos> apart from <end_of_turn>."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    tokenizer.chat_template = TEMPLATE_WITH_END_OF_TURN
    assert tokenizer.eos_token == EOS
    return prepare_tokenizer(tokenizer)


@torch.no_grad()
def bigram_policy(tokenizer, next_token: dict[str, str]):
    """The test-sized Mistral built by the registry for `tokenizer`, whose greedy next token after
    each key of `next_token` is its value (tokens as strings, e.g. {"<|assistant|>": "4"})."""
    policy = build_policy(resolve("tiny-mistral"), ModelInit(), tokenizer, seed=0).eval()
    hidden = policy.config.hidden_size
    assert len(next_token) <= hidden, "one hidden dimension per state"
    for layer in policy.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed, head = policy.get_input_embeddings().weight, policy.lm_head.weight
    embed.zero_()
    head.zero_()
    for k, (current, following) in enumerate(next_token.items()):
        embed[tokenizer.convert_tokens_to_ids(current), k] = 1.0
        head[tokenizer.convert_tokens_to_ids(following), k] = 10.0
    return policy
