"""The vLLM engine's GPU-only paths, checked without vLLM or a GPU: the order in which a sleeping
engine wakes up, and the arguments and environment each rank builds its engine with."""

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import GenerationConfig, ModelInit
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from stages.ppo import vllm_engine
from stages.ppo.models import PolicyAndValue
from stages.ppo.vllm_engine import VLLMEngine

FP32 = ModelInit(mixed_precision=None, dtype="float32")
ENGINE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *vllm_engine.CPU_DEFAULTS)


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
        """Each response: the prompt's first token, then the stop id 2."""
        self.calls.append("generate")
        self.requests = [(p["prompt_token_ids"], sp["seed"]) for p, sp in zip(prompts, params, strict=True)]
        rows = [
            SimpleNamespace(token_ids=[p["prompt_token_ids"][0], 2], logprobs=None, finish_reason="stop")
            for p in prompts
        ]
        return [SimpleNamespace(outputs=[row]) for row in rows]


def _engine(calls: list, cuda: bool) -> VLLMEngine:
    """A VLLMEngine around FakeLLM, built without vLLM (its __init__ would start one)."""
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.tokenizer = SimpleNamespace(pad_token_id=0)
    engine.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    engine.cuda, engine.stop_ids, engine.asleep = cuda, [2], set()
    engine.tp_group, engine.tp_rank = None, 0
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


@pytest.fixture(scope="module")
def tiny_policy():
    source = resolve("tiny")
    tokenizer = load_tokenizer(source, FP32)
    return PolicyAndValue(build_policy(source, FP32, tokenizer, seed=0), None), tokenizer


def _built_on(rank, local_rank, world, precision, tiny_policy, monkeypatch, tensor_parallel=1):
    """The vllm.LLM arguments and rank environment VLLMEngine gives this rank, with vLLM replaced by
    a recorder (and, for tensor parallel, torch's subgroup making)."""
    built = {}

    class RecordingLLM(FakeLLM):
        def __init__(self, **kwargs):
            super().__init__([])
            built.update(kwargs=kwargs, env={k: vllm_engine.os.environ.get(k) for k in ENGINE_ENV})

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=RecordingLLM))
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    groups = []

    def subgroups(ranks):
        groups.append(ranks)
        return f"group of {ranks[rank // tensor_parallel]}", []

    monkeypatch.setattr(torch.distributed, "new_subgroups_by_enumeration", subgroups)
    for key in ENGINE_ENV:  # unset here, and as they were after the test (delenv alone forgets an unset one)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    model, tokenizer = tiny_policy
    accelerator = SimpleNamespace(
        process_index=rank, local_process_index=local_rank, num_processes=world, unwrap_model=lambda m: m
    )
    tp = {"tensor_parallel": tensor_parallel} if tensor_parallel != 1 else {}  # 1: the default
    engine = VLLMEngine(model, tokenizer, accelerator, precision, **tp)
    return built["kwargs"], built["env"], engine, groups


def test_each_rank_builds_its_engine_on_its_own_gpu(tiny_policy, monkeypatch):
    """Two nodes of four GPUs: each of the 8 ranks starts vLLM with the external launcher, its own
    rank and its node's LOCAL_RANK (vLLM's GPU: cuda:LOCAL_RANK), and its own seed. Before, every
    rank's engine was built with none of them and landed on GPU 0 (issue 28, item 2)."""
    gpu = dataclasses.replace(resolve_precision(FP32), cuda=True, dtype=torch.bfloat16)
    devices = set()
    for rank in range(8):
        kwargs, env, engine, groups = _built_on(rank, rank % 4, 8, gpu, tiny_policy, monkeypatch)
        assert kwargs["distributed_executor_backend"] == "external_launcher"
        assert kwargs["tensor_parallel_size"] == 1 and kwargs["seed"] == rank and kwargs["enable_sleep_mode"]
        assert kwargs["dtype"] == "bfloat16" and not kwargs["enforce_eager"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == str(rank % 4)
        assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert env["MASTER_PORT"]  # one process alone: vLLM starts the process group itself
        assert engine.tp_group is None and groups == []
        devices.add((rank // 4, env["LOCAL_RANK"]))  # (node, GPU)
    assert len(devices) == 8


def test_tensor_parallel_engines_span_consecutive_ranks(tiny_policy, monkeypatch):
    """rollout.vllm_tensor_parallel=2 on 8 ranks: TRL's groups [0,1] [2,3] [4,5] [6,7], one seed per
    group (its members must draw the same tokens), each rank its own GPU still."""
    gpu = dataclasses.replace(resolve_precision(FP32), cuda=True)
    for rank in range(8):
        kwargs, env, engine, groups = _built_on(rank, rank, 8, gpu, tiny_policy, monkeypatch, tensor_parallel=2)
        assert groups == [[[0, 1], [2, 3], [4, 5], [6, 7]]]
        assert kwargs["tensor_parallel_size"] == 2 and kwargs["seed"] == rank // 2 and env["LOCAL_RANK"] == str(rank)
        assert engine.tp_rank == rank % 2
    with pytest.raises(ValueError, match="vllm_tensor_parallel"):
        _built_on(0, 0, 8, gpu, tiny_policy, monkeypatch, tensor_parallel=3)  # 3 does not divide 8
    with pytest.raises(ValueError, match="vllm_tensor_parallel"):
        _built_on(0, 0, 2, resolve_precision(FP32), tiny_policy, monkeypatch, tensor_parallel=2)  # the CPU


def test_the_cpu_engine_is_built_as_before(tiny_policy, monkeypatch):
    """On the CPU: no external launcher, no rank environment, the process's seed, eager mode."""
    cpu = resolve_precision(FP32)
    assert not cpu.cuda
    kwargs, env, _, _ = _built_on(1, 1, 2, cpu, tiny_policy, monkeypatch)
    assert "distributed_executor_backend" not in kwargs and "tensor_parallel_size" not in kwargs
    assert kwargs["seed"] == 1 and kwargs["enforce_eager"] and not kwargs["enable_sleep_mode"]
    assert env["RANK"] is None and env["LOCAL_RANK"] is None and env["MASTER_PORT"] is None
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # CPU_DEFAULTS, as before


def test_a_tensor_parallel_engine_samples_its_groups_prompts_and_keeps_its_own(monkeypatch):
    """Rank 1 of a group of 2: the engine samples rank 0's 3 prompts and its own 2 (each with the seed
    its rank drew), in rank order, and returns rows 3 and 4: its own."""
    engine = _engine([], cuda=True)
    engine.tp_group, engine.tp_rank = "group", 1
    theirs = [([11, 12], 101), ([13], 102), ([14, 15, 16], 103)]
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    def all_gather_object(out, mine, group=None):
        out[0], out[1] = theirs, mine

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    torch.manual_seed(0)
    seeds = torch.randint(0, 2**31 - 1, (2,)).tolist()
    torch.manual_seed(0)
    sampled = engine.generate([[21, 22], [23]], GenerationConfig(max_new_tokens=4, do_sample=True), with_logprobs=False)
    assert engine.llm.requests == [*theirs, ([21, 22], seeds[0]), ([23], seeds[1])]
    assert sampled.response_ids.tolist() == [[21, 2], [23, 2]]  # its own prompts' rows
    assert sampled.prompt_ids.tolist() == [[21, 22], [0, 23]]


def test_vllm_tensor_parallel_must_be_positive():
    from conftest import ROOT
    from rlhf.config import ConfigError, PPOStageConfig, load_config

    with pytest.raises(ConfigError, match=r"vllm_tensor_parallel.*must be >= 1"):
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["rollout.vllm_tensor_parallel=0"])


def test_the_engine_tests_leave_no_rank_environment_behind():
    """The tests above build engines that set RANK, WORLD_SIZE, … (8 ranks); a WORLD_SIZE left
    behind made the next test's accelerate wait for 7 processes that never came."""
    assert "WORLD_SIZE" not in vllm_engine.os.environ or vllm_engine.os.environ["WORLD_SIZE"] != "8"
