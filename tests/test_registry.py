"""The model registry builds policy, reward and value models for four decoder architectures, and
loads them back from local directories (full weights and LoRA adapters)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config import LoraConfig, ModelInit
from rlhf.registry import (
    PRESETS,
    ModelLoadError,
    backbone,
    build_policy,
    build_scalar_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve,
    score_head,
)

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]
INIT = ModelInit()


def batch(tokenizer):
    tokenizer.padding_side = "right"
    return tokenizer(["请计算：12 - 3 = ，直接返回计算结果", "请计算：1 - 2 = "], return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", ARCHS)
def test_policy_and_scalar_models_for_each_architecture(name, tmp_path):
    source = resolve(name)
    tokenizer = load_tokenizer(source, INIT)
    policy = build_policy(source, INIT, tokenizer, seed=0).eval()
    inputs = batch(tokenizer)
    logits = policy(**inputs).logits  # (B, T, V)
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()

    reward = build_scalar_model(source, INIT, tokenizer, seed=0).eval()
    assert reward(**inputs).logits.shape == (2, 1)
    hidden = backbone(reward)(**inputs).last_hidden_state  # (B, T, H)
    assert score_head(reward)(hidden).shape == (2, inputs["input_ids"].shape[1], 1)

    # Save and load back with plain transformers from the local directory.
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert torch.allclose(again(**inputs).logits, logits, atol=1e-5)
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    # ... and through the registry, as a later stage would.
    source2 = resolve(str(tmp_path / "policy"))
    assert source2.path == str(tmp_path / "policy")
    assert torch.allclose(
        build_policy(source2, INIT, load_tokenizer(source2, INIT))(**inputs).logits, logits, atol=1e-5
    )
    # A reward model initialised from that causal LM keeps its body and gets a fresh head.
    rm = build_scalar_model(source2, INIT, load_tokenizer(source2, INIT))
    assert torch.allclose(
        backbone(rm)(**inputs).last_hidden_state, backbone(again)(**inputs).last_hidden_state, atol=1e-5
    )


@pytest.mark.parametrize("name", ARCHS)
def test_lora_wraps_each_architecture(name):
    source = resolve(name)
    tokenizer = load_tokenizer(source, INIT)
    model = build_policy(source, INIT, tokenizer, LoraConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    scalar = build_scalar_model(source, INIT, tokenizer, LoraConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in scalar.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)


def test_lora_adapter_directory_resolves_to_its_base(tmp_path):
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, INIT)
    model = build_policy(source, INIT, tokenizer, LoraConfig(enabled=True, r=4, alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter do something
    inputs = batch(tokenizer)
    expected = model.eval()(**inputs).logits
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    build_policy(source, INIT, tokenizer, seed=0).save_pretrained(tmp_path / "sft" / "base_model")
    loaded_source = resolve(str(tmp_path / "sft"))
    assert loaded_source.adapter == str(tmp_path / "sft")
    merged = build_policy(loaded_source, INIT, load_tokenizer(loaded_source, INIT))
    assert torch.allclose(merged(**inputs).logits, expected, atol=1e-4)

    # with the merged weights saved beside the adapter (lora.merge_on_save), those are loaded
    merged.save_pretrained(tmp_path / "sft" / "merged")
    tokenizer.save_pretrained(tmp_path / "sft" / "merged")
    from_merged = resolve(str(tmp_path / "sft"))
    assert (from_merged.path, from_merged.adapter) == (str(tmp_path / "sft" / "merged"), None)
    reloaded = build_policy(from_merged, INIT, load_tokenizer(from_merged, INIT))
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-4)


def test_pad_token_is_never_eos():
    tok = AutoTokenizer.from_pretrained(str(_saved_tokenizer_without_pad()))
    assert tok.pad_token is None
    tok = prepare_tokenizer(tok)
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template


def _saved_tokenizer_without_pad(path="/tmp/rlhf-test-tok-nopad"):
    from rlhf.registry import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.chat_template = None
    tok.save_pretrained(path)
    return path


def test_unknown_names_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve("runs/nothing/sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve(str(tmp_path / "empty"))
    source = resolve("nobody/no-such-model")  # looks like a hub id; offline in tests
    with pytest.raises(ModelLoadError, match="cannot load model 'nobody/no-such-model'"):
        load_tokenizer(source, INIT)


def test_presets_cover_popular_families():
    hub = {p.hub_id for p in PRESETS.values() if p.hub_id}
    for family in ("Qwen/Qwen2.5", "meta-llama/Llama-3", "mistralai/Mistral", "google/gemma", "openai-community/gpt2"):
        assert any(h.startswith(family) for h in hub), family


def test_saved_reward_model_loads_with_auto_class(tmp_path):
    source = resolve("tiny-qwen2")
    tokenizer = load_tokenizer(source, INIT)
    rm = build_scalar_model(source, INIT, tokenizer, seed=0)
    rm.save_pretrained(tmp_path / "rm")
    inputs = batch(tokenizer)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert torch.allclose(again(**inputs).logits, rm(**inputs).logits, atol=1e-5)


def test_cpu_bf16_keeps_attention_in_fp32_and_saves_a_plain_config(tmp_path):
    """The rule itself (which machine gets bf16 autocast) is tested in tests/test_precision.py."""
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, INIT)
    bf16 = build_policy(source, ModelInit(mixed_precision="bf16"), tokenizer, seed=0)
    assert bf16.config._attn_implementation == "sdpa_fp32" and bf16.dtype == torch.float32
    tokenizer.padding_side = "left"  # generation's padding: the pads must stay masked in fp32 attention too
    ids = tokenizer(["请计算：12 - 3 = ", "请计算：99999 - 12345 = "], return_tensors="pt", padding=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = bf16(**ids).logits
    plain = build_policy(source, INIT, tokenizer, seed=0)(**ids).logits  # same weights, fp32 throughout
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float()[:, -1], plain[:, -1], atol=0.05)  # the padded row's next token too
    chosen = build_policy(source, ModelInit(mixed_precision="bf16", attn_implementation="sdpa"), tokenizer, seed=0)
    assert chosen.config._attn_implementation == "sdpa"
    bf16.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "sdpa_fp32" not in (tmp_path / "config.json").read_text()  # plain transformers reloads it
    reloaded = build_scalar_model(resolve(str(tmp_path)), ModelInit(mixed_precision="bf16"), tokenizer)
    assert reloaded.config._attn_implementation == "sdpa_fp32"
    if not torch.cuda.is_available():
        assert build_policy(source, INIT, tokenizer, seed=0).config._attn_implementation == "sdpa"


def test_qwen2_5_0_5b_shape_preset_has_the_real_architecture():
    """The random-init stand-in for Qwen2.5-0.5B (tools/smoke_real_shape.py) has the real model's
    shape. Parameters, worked out by hand from its config.json:
      embeddings 151,936 x 896 = 136,134,656 (tied: the LM head adds none)
      per layer: q 896x896 + 896 bias = 803,712; k and v 896x128 + 128 = 114,816 each (2 KV heads
      x head dim 64); o 896x896 = 802,816; MLP 3 x 896x4864 = 13,074,432; two norms 1,792
      -> 14,912,384, x 24 layers = 357,897,216; final norm 896
      total 494,032,768 (the published count)."""
    source = resolve("qwen2.5-0.5b-shape")
    assert source.path is None  # built in: nothing to download
    config = source.preset.make_config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (151_936, 896, 4864)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1_000_000.0
    with torch.device("meta"):  # shapes only, no 2 GB of weights
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (128, 896) and attn.q_proj.weight.shape == (896, 896)
    # our tokenizer's ids all fall inside the real vocabulary: no resize, pad and EOS as the tiny models'
    tokenizer = load_tokenizer(source, INIT)
    assert len(tokenizer) < config.vocab_size
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def _bf16_lora_with_a_small_delta():
    """A bf16 linear layer holding 1.0, under a LoRA adapter whose delta B·A·scaling is 0.003 everywhere."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)).to(torch.bfloat16)
    torch.nn.init.ones_(base[0].weight)
    model = get_peft_model(base, PeftLoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(0.003)
    return model, layer


def test_lora_merges_in_fp32():
    """bf16(1.0 + 0.003) = 1.0: a delta under half a bf16 ulp vanishes when W + B·A·s is added in bf16, so the
    merged model (and vLLM's copy) would lag the trained one. Merged in fp32, the update survives."""
    from rlhf.registry import merge_lora
    from stages.ppo.vllm_engine import _merged_weight

    model, layer = _bf16_lora_with_a_small_delta()
    assert (torch.ones((), dtype=torch.bfloat16) + 0.003).item() == 1.0  # the bf16 sum loses it
    sent = _merged_weight(layer, layer.base_layer.weight)  # what the vLLM engine is sent
    assert sent.float().sub(1.003).abs().max().item() < 1e-6
    merged = merge_lora(model)
    assert merged[0].weight.dtype == torch.float32
    assert merged[0].weight.sub(1.003).abs().max().item() < 1e-6
    model, _ = _bf16_lora_with_a_small_delta()
    assert merge_lora(model, torch.bfloat16)[0].weight.dtype == torch.bfloat16  # cast after the fp32 sum
