"""The built-in tiny models: a tokenizer the project builds itself and small decoder configs.

Nothing here downloads anything. The tokenizer is deterministic: building it twice gives the same
ids, so a saved tiny model stays readable by any later build.

Design of the tokenizer (see docs/tiny-default.md):
- every digit is its own token (a digit pre-tokenizer guarantees it), so the model sees numbers
  digit by digit;
- the fixed phrases of seed 000's prompts are single tokens, so a subtraction item is about
  a dozen tokens instead of thirty characters;
- the characters of the seed prompts and printable ASCII are tokens; anything else falls back to
  its UTF-8 bytes (`<0x..>` tokens), so every text encodes and decodes without loss.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, SYSTEM, USER, ASSISTANT]

# Seed 000's prompts: the plain test prompt and the few-shot SFT prompt (its example lines).
PHRASES = [
    "请计算：",
    " - ",
    " + ",
    " = ，",
    "直接返回计算结果",
    "，直接返回计算结果",
    "<input>",
    "</input>",
    "<output>",
    "</output>",
    "你是一个数学计算器，能计算两个数字的减法。",
    "请直接返回计算结果，不要包含计算过程，也不要包含算式和等于号，直接给出结果的数字。",
    "例子：",
    "输入：",
]
EXTRA_CHARS = "，。：；！？、（）《》“”‘’…—"

# Role markers only; the template adds no whitespace so a subtraction item stays short.
# `{% generation %}` marks assistant tokens for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens: list[str] = list(SPECIAL_TOKENS)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    chars = string.digits + string.ascii_letters + string.punctuation + " \n\t" + EXTRA_CHARS
    chars += "".join(PHRASES)
    for ch in chars:
        if ch not in tokens:
            tokens.append(ch)
    merges: list[tuple[str, str]] = []
    for phrase in PHRASES:  # merge left to right: a, ab, abc, ... so each phrase ends as one token
        acc = phrase[0]
        for ch in phrase[1:]:
            if acc + ch not in tokens:
                merges.append((acc, ch))
                tokens.append(acc + ch)
            acc += ch
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer, with pad/eos set and the chat template saved in it."""
    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_vocab_size() -> int:
    """Embedding rows for the tiny models: the vocabulary rounded up to a multiple of 64."""
    n = len(_vocab_and_merges()[0])
    return (n + 63) // 64 * 64
