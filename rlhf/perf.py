"""What a step costs and how fast it ran: a FLOP model of a decoder's forward and backward, the
device's peak (a table of GPU peaks, a measured matmul peak on a CPU, measured once per process),
peak memory, a clock that waits for the GPU and the phase timer built on it. Pure functions of
shapes and token counts, shared by the PPO loop's `perf/…` metrics, tools/gpu_check.py and
tools/bench_ppo.py.

FLOP counting follows Kaplan et al. 2020 (2 FLOPs per matmul parameter per token forward) and
PaLM's appendix B (the attention scores' own FLOPs), with causal attention counted as the half of
the square that a causal kernel computes."""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    """The shape that sets a decoder's FLOPs per token."""

    params: int  # matmul parameters every token passes through: the trunk (and a scalar head); no embedding
    head: int  # the LM head (tied or not), run only where logits are kept (response positions); 0: a scalar model
    layers: int
    attn_dim: int  # query heads × head dimension: the width of the attention scores' products


def trunk_params(config) -> int:
    """A Llama-style decoder's parameters without embeddings: attention (q, o full; k, v per KV
    head), the gated MLP's three matrices and two norms per layer, and the final norm."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    attn = 2 * h * config.num_attention_heads * head_dim + 2 * h * kv
    return layers * (attn + 3 * h * config.intermediate_size + 2 * h) + h


def flop_model(model: torch.nn.Module) -> FlopModel:
    """The FlopModel of a transformers model (a causal LM; a reward or value model with a scalar
    head), read off its parameters whatever the architecture: all of them but the input embedding
    (a lookup), the LM head apart (tied or not). A ZeRO-3 partitioned parameter counts whole."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head = numel(output.weight) if output is not None else 0
    tied = output is not None and output.weight is embedding
    total = sum(numel(p) for p in model.parameters())  # a tied matrix once
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(
        params=total - numel(embedding) - (0 if tied else head),
        head=head,
        layers=config.num_hidden_layers,
        attn_dim=config.num_attention_heads * head_dim,
    )


def matmul_flops(m: FlopModel, lengths: list[int], head_tokens: int) -> float:
    """The matmuls of one forward: 2 FLOPs per parameter per token, the LM head's at `head_tokens`
    positions only."""
    return 2.0 * m.params * sum(lengths) + 2.0 * m.head * head_tokens


def forward_flops(m: FlopModel, lengths: list[int], head_tokens: int) -> float:
    """One forward over sequences of `lengths` real tokens, logits at `head_tokens` positions: the
    matmuls, and per sequence of T tokens 2·layers·attn_dim·T² for the attention scores and their
    weighted sum (2 products of 2 FLOPs over the T²/2 causal pairs). A KV-cached generation costs
    about one forward over the finished sequence."""
    return matmul_flops(m, lengths, head_tokens) + 2.0 * m.layers * m.attn_dim * sum(t * t for t in lengths)


def train_flops(m: FlopModel, lengths: list[int], head_tokens: int, *, full: bool, checkpointing: bool) -> float:
    """A forward and backward. The backward computes the activations' gradients (the matmuls'
    FLOPs once more, attention's twice: gradients of both its products' inputs) and, for trained
    weights, the weights' gradients (the matmuls' once more): 6·N per token and 3× the attention
    for full fine-tuning (PaLM's count), ~4·N with LoRA (its adapters' share is negligible).
    Gradient checkpointing recomputes the forward once more before the backward."""
    fwd = forward_flops(m, lengths, head_tokens)
    matmul = matmul_flops(m, lengths, head_tokens)
    attention = fwd - matmul
    backward = matmul * (2 if full else 1) + 2 * attention
    return fwd + backward + (fwd if checkpointing else 0.0)


# Dense (no sparsity) peak TFLOP/s of the GPUs we may be lent, from NVIDIA's data sheets: bf16
# tensor cores, and fp32 without TF32. Matched in order against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "PCIe"), {"bf16": 756.0, "fp32": 51.2}),
    (("H100", "NVL"), {"bf16": 835.5, "fp32": 60.0}),
    (("H100",), {"bf16": 989.4, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200",), {"bf16": 989.4, "fp32": 66.9}),
    (("A100",), {"bf16": 312.0, "fp32": 19.5}),
]


def gpu_peak_flops(name: str, dtype: str) -> float | None:
    """The table's peak FLOP/s of the GPU called `name` at `dtype` ("bf16" or "fp32"); None for a
    GPU the table does not know."""
    for words, peaks in GPU_PEAK_TFLOPS:
        if all(w in name for w in words):
            return peaks[dtype] * 1e12
    return None


def matmul_peak(
    threads: int, size: int = 2048, budget_s: float = 20.0, dtypes: tuple[str, ...] = ("fp32", "bf16")
) -> dict[str, float]:
    """This CPU's measured matmul GFLOP/s at `threads`, for each of `dtypes`: the best of up to 5
    size x size products each (a CPU without bf16 instructions emulates bf16 slowly: the time
    budget bounds it)."""
    torch.set_num_threads(threads)
    peak = {}
    for name in dtypes:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        # a generator of its own: measured mid-run, the global one would shift the run's sampling
        # (a resumed run would no longer repeat an uninterrupted one)
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, dtype=dtype, generator=gen) for _ in range(2))
        a @ b  # warm-up
        best, started = float("inf"), time.perf_counter()
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() - started > budget_s / 2:
                break
        peak[name] = round(2 * size**3 / best / 1e9, 1)
    return peak


@functools.cache
def _cpu_peak_gflops(threads: int, dtype: str) -> float:
    return matmul_peak(threads, size=1024, budget_s=2.0, dtypes=(dtype,))[dtype]  # under a second or two, once


def device_peak_flops(device: torch.device, dtype: str) -> float:
    """The peak FLOP/s MFU is measured against: the table's for a known GPU; for a CPU (and a GPU
    the table does not know) a measured matmul peak, an upper bound of what this machine reaches."""
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
        return _cuda_matmul_peak(device, dtype)
    return _cpu_peak_gflops(torch.get_num_threads(), dtype) * 1e9


@functools.cache
def _cuda_matmul_peak(device: torch.device, dtype: str) -> float:
    gen = torch.Generator(device).manual_seed(0)  # not the global one: see matmul_peak
    a = torch.randn(
        8192, 8192, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, generator=gen
    )
    a @ a
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize(device)
    return 5 * 2 * 8192**3 / (time.perf_counter() - t)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work: a phase boundary on a GPU
    (whose kernels run asynchronously) would otherwise charge one phase's work to the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def timer(name: str, timings: dict[str, float], device: torch.device) -> Iterator[None]:
    """Time one phase of a step (veRL's `marked_timer`): `with timer("generate", timings, device):`
    adds the phase's seconds to timings[name], read by `clock` at both ends so that a GPU's queued
    work is charged to the phase that queued it. The loop logs each entry as
    train/ppo/time_<name>_s and perf/… reads them; a phase that raises is still charged."""
    start = clock(device)
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + clock(device) - start


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory so far: `perf/max_memory_allocated_gb` (torch's CUDA allocator) on a GPU; on a
    CPU `perf/max_rss_gb`, the process's peak resident memory (the OS's count, not torch's)."""
    if device.type == "cuda":
        return {"perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"perf/max_rss_gb": rss / (1e9 if sys.platform == "darwin" else 1e6)}


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOPs the model's arithmetic needs over what the peak does in
    that time."""
    return flops / max(seconds, 1e-9) / peak_flops
