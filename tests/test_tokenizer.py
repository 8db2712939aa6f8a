"""The tiny tokenizer: lossless on any text, digits one token each, compact seed prompts. And
every preset's stop tokens, from its real tokenizer config (tests/fixtures/tokenizers)."""

import json
import string
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from rlhf.registry import PRESETS, build_tiny_tokenizer, end_of_turn_id, prepare_tokenizer, stop_token_ids
from rlhf.tasks.subtraction import FEWSHOT_PROMPT, PROMPT

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"

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


# hub id -> (fixture directory, end of turn, every stop id), by hand from the published files
# (tests/fixtures/tokenizers/README.md names the source of each)
HUB_TOKENIZERS = {
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2.5-instruct", 151645, {151645, 151643}),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2.5-instruct", 151645, {151645, 151643}),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2.5-instruct", 151645, {151645, 151643}),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama-3.2-instruct", 128009, {128009, 128001, 128008}),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-instruct", 128009, {128009, 128001, 128008}),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral-7b-instruct-v0.3", 2, {2}),
    "google/gemma-2-2b-it": ("gemma-2-it", 107, {107, 1}),
    "openai-community/gpt2": ("gpt2", 50256, {50256}),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("smollm2-instruct", 2, {2}),
}


def fixture_tokenizer(directory: Path, tmp_path: Path) -> PreTrainedTokenizerFast:
    """The preset's tokenizer as `load_tokenizer` prepares it, from its stored config: a vocabulary of
    the special tokens at their real ids plus ASCII characters (one token each) after them."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    special = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    vocab = {content: i for i, content in special.items()}
    for ch in ["[UNK]", *string.printable]:
        vocab.setdefault(ch, max(vocab.values()) + 1)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens([AddedToken(content, special=True, normalized=False) for content in special.values()])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp_path))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_stops_at_its_end_of_turn(name, tmp_path):
    """Issue 14 item 10: a response ends at the token the preset's chat template closes an
    assistant turn with (Gemma's <end_of_turn>, Llama 3's <|eot_id|>), at EOS, and at the ids of
    its generation_config.json; never at EOS alone."""
    preset = PRESETS[name]
    if preset.builtin:
        tokenizer, generation, eot, stops = build_tiny_tokenizer(), None, 1, {1}  # <|end|> is EOS and end of turn
    else:
        assert preset.hub_id in HUB_TOKENIZERS, f"store {preset.hub_id}'s tokenizer config in {FIXTURES}"
        directory, eot, stops = HUB_TOKENIZERS[preset.hub_id]
        tokenizer = fixture_tokenizer(FIXTURES / directory, tmp_path)
        generation = GenerationConfig.from_pretrained(FIXTURES / directory)
    assert end_of_turn_id(tokenizer) == eot
    found = stop_token_ids(tokenizer, generation)
    assert found[0] == eot and set(found) == stops
    # the rendered exchange really holds that token right after the answer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": "42"}])
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert eot in ids
