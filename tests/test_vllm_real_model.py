"""The vLLM rollout engine on the real model (markers `real` and `vllm`; `make test-vllm` runs it
in .venv-vllm): built on SmolLM2-135M-Instruct loaded from the GGUF's converted directory, its
greedy responses to chat prompts equal the HF engine's token for token."""

import pytest
import torch
from accelerate import Accelerator
from test_real_model import PRESET, real_model_missing

from rlhf.config import GenerationConfig, ModelInit
from rlhf.generation import render_prompts
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from stages.ppo.engines import HFEngine
from stages.ppo.models import PolicyAndValue
from stages.ppo.vllm_engine import VLLMEngine, vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.real,
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (its own environment: make vllm)"),
    pytest.mark.skipif(bool(real_model_missing()), reason=str(real_model_missing())),
]

FP32 = ModelInit(mixed_precision=None, dtype="float32")
QUESTIONS = [
    "What is the capital of France?",
    "请计算：47 - 19 = ，直接返回计算结果",
    "Name a primary colour.",
    "2 + 2 =",
]


def test_greedy_responses_equal_the_hf_engines():
    source = resolve(PRESET)
    tokenizer = load_tokenizer(source, FP32)
    policy = build_policy(source, FP32, tokenizer).eval()
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])
    accelerator = Accelerator(cpu=True)
    model = PolicyAndValue(policy, None)
    engine = VLLMEngine(model, tokenizer, accelerator, resolve_precision(FP32))
    try:
        greedy = GenerationConfig(max_new_tokens=16, do_sample=False)
        a = HFEngine(model, tokenizer, accelerator).generate(prompts, greedy, False)
        b = engine.generate(prompts, greedy, False)
    finally:
        engine.close()
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    assert torch.equal(a.response_ids, b.response_ids), (a.response_ids, b.response_ids)
    assert "Paris" in tokenizer.decode(b.response_ids[0], skip_special_tokens=True)
