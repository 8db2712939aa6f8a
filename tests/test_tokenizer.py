"""The tiny tokenizer: lossless on any text, digits one token each, compact seed prompts."""

from transformers import AutoTokenizer

from rlhf.registry import build_tiny_tokenizer
from rlhf.tasks.subtraction import FEWSHOT_PROMPT, PROMPT

TEXTS = [
    PROMPT % (12345, 678),
    FEWSHOT_PROMPT % (98, -7),
    "plain ASCII, punctuation!? and\ttabs\nnewlines",
    "日本語のテキスト, Ελληνικά, emoji 🎉🚀, accents é ü ñ",
    "  leading and trailing spaces  ",
    "\u0000 control \u0007 chars",
]


def test_round_trip_is_lossless():
    tok = build_tiny_tokenizer()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_digits_are_single_tokens():
    tok = build_tiny_tokenizer()
    ids = tok("9081726354", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("9081726354")


def test_seed_prompt_is_compact():
    # <|user|> 请计算： 1 2 3 4 5 " - " 6 7 8 " = ，" 直接返回计算结果 <|assistant|>: 14 tokens
    tok = build_tiny_tokenizer()
    messages = [{"role": "user", "content": PROMPT % (12345, 678)}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert len(ids) == 14


def test_chat_template_and_special_tokens_survive_save(tmp_path):
    tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": PROMPT % (3, 4)}, {"role": "assistant", "content": "-1"}]
    text = again.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>请计算：3 - 4 = ，直接返回计算结果<|assistant|>-1<|end|>"
    assert again.pad_token == "<|pad|>" and again.eos_token == "<|end|>"
    assert again.pad_token_id != again.eos_token_id
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_build_is_deterministic():
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()
