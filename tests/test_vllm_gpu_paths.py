"""The vLLM engine's GPU-only paths, checked without vLLM or a GPU: the order in which a sleeping
engine wakes up, and the arguments and environment each rank builds its engine with."""

from types import SimpleNamespace

import torch

from rlhf.config import GenerationConfig
from stages.ppo.vllm_engine import VLLMEngine


class FakeLLM:
    """Records what the engine asks of vLLM's `LLM`, in order, into `calls`."""

    def __init__(self, calls: list):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags or ['all'])})")

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(method)

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        row = SimpleNamespace(token_ids=[5, 2], logprobs=None, finish_reason="stop")
        return [SimpleNamespace(outputs=[row]) for _ in prompts]


def _engine(calls: list, cuda: bool) -> VLLMEngine:
    """A VLLMEngine around FakeLLM, built without vLLM (its __init__ would start one)."""
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.tokenizer = SimpleNamespace(pad_token_id=0)
    engine.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    engine.cuda, engine.stop_ids, engine.asleep = cuda, [2], set()
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    engine.llm = FakeLLM(calls)
    return engine


def test_a_sleeping_engine_wakes_its_weights_then_its_kv_cache(monkeypatch):
    """TRL's order (trl/generation/vllm_generation.py): the trainer's cached blocks freed, the
    weights woken and refilled by update_weights; at sampling, a device sync, then the KV cache.
    A CPU engine never sleeps, so none of it runs there (no torch.cuda call on a CPU build)."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    model = SimpleNamespace(policy=torch.nn.Linear(2, 2))
    gen = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.0)

    engine = _engine(calls, cuda=True)
    engine.sleep()
    engine.update_weights(model)
    engine.generate([[7, 8]], gen, with_logprobs=False)
    engine.sleep()
    assert calls == [
        "sleep(2)",
        "empty_cache",
        "wake_up(weights)",
        "reload_weights",
        "apply_model",
        "synchronize",
        "empty_cache",
        "wake_up(kv_cache)",
        "generate",
        "sleep(2)",
    ]

    calls.clear()
    engine = _engine(calls, cuda=False)
    engine.sleep()
    engine.update_weights(model)
    engine.generate([[7, 8]], gen, with_logprobs=False)
    assert calls == ["reload_weights", "apply_model", "generate"]
