"""Rollout speed of the two engines, transformers' generate (`hf`) and vLLM (`vllm`), on the same
random weights at the same precision, and one full PPO step's time split with each.

    .venv-vllm/bin/python -m tools.bench_rollout --ppo-step         # every size, then the PPO step
    .venv-vllm/bin/python -m tools.bench_rollout --sizes 1m,30m     # some sizes only
    .venv-vllm/bin/python -m tools.bench_rollout --sizes 120m --ppo-step   # the largest, and the step

Needs vLLM (`make vllm`). The set-up: random-weight decoders built from a config (~1M: a Llama of
hidden 128 and a 2,048-token vocabulary; ~30M: a Qwen2 shape, hidden 512, 6 layers, GQA 8/2,
32k vocabulary; ~120M: a Llama shape, hidden 768, 12 layers, 32k vocabulary; tied embeddings),
64 prompts of 16 random tokens, 256 new tokens sampled at temperature 1 from the full softmax,
with each sampled token's log-prob, as PPO asks for them; the tiny tokenizer's stop tokens end a
response (random weights rarely draw one) and tokens are counted up to each response's stop. Both engines hold bf16
weights (`--precision fp32` for fp32). Each engine samples once untimed (warm-up), then `--runs`
timed batches; tokens/s = generated tokens / wall time of the batch, median over runs.

`--ppo-step`: one PPO step through the real recipe (stages/ppo/train.py) on the largest size
named in --sizes, 64 prompts × 256 new tokens, the subtraction rule as reward, the value head on
the policy's trunk, bf16 mixed precision, with each engine: the seconds of generate (step 1),
score (steps 2-5), train (step 6) and weight sync of the run's first step (one step per engine
keeps the benchmark within a few minutes on 2 cores; the engines are built and loaded before it).

The last line printed is one JSON object: tokens/s per engine and size (small to large),
`ratio_vllm_vs_hf` per size, and the PPO steps' splits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rlhf.config import GenerationConfig, ModelInit, PPOStageConfig, load_config
from rlhf.generation import ended_at
from rlhf.precision import resolve_precision
from rlhf.registry import stop_token_ids
from rlhf.registry.tiny import build_tiny_tokenizer
from rlhf.tracking import read_metrics
from stages.ppo import train as ppo_train
from stages.ppo.engines import HFEngine
from stages.ppo.models import PolicyAndValue
from stages.ppo.vllm_engine import VLLMEngine

ROOT = Path(__file__).resolve().parents[1]

PROMPTS, PROMPT_LEN, NEW_TOKENS = 64, 16, 256
SHAPES = {
    "1m": lambda: LlamaConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4
    ),
    "30m": lambda: Qwen2Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "120m": lambda: LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
    ),
}


def build_model(size: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random decoder of `size` whose pad/EOS ids are the tiny tokenizer's."""
    tokenizer = build_tiny_tokenizer()
    config = SHAPES[size]()
    config.update(
        {
            "tie_word_embeddings": True,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tokens_per_s(engine, prompts: list[list[int]], stops: tuple[int, ...], runs: int) -> tuple[float, list[float]]:
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0)
    engine.generate(prompts[:4], GenerationConfig(max_new_tokens=8, do_sample=True), True)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        out = engine.generate(prompts, gen, True)
        seconds = time.perf_counter() - start
        rates.append(ended_at(out.response_ids, stops)[1].sum().item() / seconds)  # tokens up to each stop
    return statistics.median(rates), rates


def bench_size(size: str, precision_name: str, runs: int) -> dict:
    init = ModelInit(dtype="bfloat16" if precision_name == "bf16" else "float32", mixed_precision=None)
    precision = resolve_precision(init)
    policy = build_model(size, precision.dtype)
    params = sum(p.numel() for p in policy.parameters())
    tokenizer = build_tiny_tokenizer()
    stops = stop_token_ids(tokenizer, policy.generation_config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = PolicyAndValue(policy.to(accelerator.device), None)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, policy.config.vocab_size - 1, (PROMPTS, PROMPT_LEN), generator=g).tolist()
    row = {"params": params}
    row["hf"], row["hf_runs"] = tokens_per_s(HFEngine(model, tokenizer, accelerator), prompts, stops, runs)
    vllm = VLLMEngine(model, tokenizer, accelerator, precision)
    row["vllm"], row["vllm_runs"] = tokens_per_s(vllm, prompts, stops, runs)
    row["ratio_vllm_vs_hf"] = row["vllm"] / row["hf"]
    print(f"{size}: {params / 1e6:.1f}M params, hf {row['hf']:.0f} tok/s, vllm {row['vllm']:.0f} tok/s", flush=True)
    del vllm
    return row


def ppo_step(size: str, engine: str, workdir: Path) -> dict:
    """Time split of one PPO step through the real recipe, with `engine`."""
    policy_dir = workdir / f"policy-{size}"
    if not policy_dir.exists():
        build_model(size, torch.float32).save_pretrained(policy_dir)
        build_tiny_tokenizer().save_pretrained(policy_dir)
    out = workdir / f"ppo-{engine}"
    overrides = [f"policy={policy_dir}", f"output_dir={out}", "reward_model=null", "reward.model_weight=0"]
    overrides += ["reward.rules={subtraction: 1.0}"]
    overrides += ["share_policy_trunk=true", "rollout.prompts_per_step=64", "ppo.minibatches=4"]
    overrides += [f"rollout.generation.max_new_tokens={NEW_TOKENS}", f"rollout.engine={engine}"]
    overrides += ["train.max_steps=1", "train.save_every=0", "train.eval_every=0", "ppo.value_warmup_steps=0"]
    overrides += ["tracking.report_to=[]", "tracking.progress=false", "task.train_size=256", "task.eval_size=8"]
    overrides += ["model_init.mixed_precision=bf16", "reward.missing_eos_penalty=null"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))
    last = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/time_generate_s" in r][-1]
    split = {k: last[f"train/ppo/time_{k}_s"] for k in ("generate", "score", "sync", "train")}
    split["response_length"] = last["train/ppo/response_length"]
    print(f"ppo step {size} {engine}: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()), flush=True)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description="Rollout tokens/s of the hf and vllm engines, and a PPO step split.")
    parser.add_argument("--sizes", default="1m,30m,120m", help="comma-separated, of " + ",".join(SHAPES))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--runs", type=int, default=1, help="timed batches per engine and size")
    parser.add_argument("--ppo-step", action="store_true", help="also one PPO step per engine at the largest size")
    parser.add_argument("--one-ppo-step", nargs=3, metavar=("SIZE", "ENGINE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_ppo_step:  # the child process of ppo_step_process
        size, engine, workdir = args.one_ppo_step
        print(json.dumps(ppo_step(size, engine, Path(workdir))))
        return
    sizes = [s for s in SHAPES if s in args.sizes.split(",")]  # small to large
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "precision": args.precision}
    result["threads"] = torch.get_num_threads()
    result["tokens_per_s"] = {size: bench_size(size, args.precision, args.runs) for size in sizes}
    result["ratio_vllm_vs_hf"] = {size: row["ratio_vllm_vs_hf"] for size, row in result["tokens_per_s"].items()}
    if args.ppo_step:
        with tempfile.TemporaryDirectory(prefix="bench-rollout-") as workdir:
            result["ppo_step_s"] = {engine: ppo_step_process(sizes[-1], engine, workdir) for engine in ("hf", "vllm")}
    print(json.dumps(result))


def ppo_step_process(size: str, engine: str, workdir: str) -> dict:
    """`ppo_step` in a process of its own: the recipe builds its own Accelerator (bf16 mixed
    precision) and vLLM engine, which a process that already holds the rollout benchmark's cannot."""
    cmd = [sys.executable, "-m", "tools.bench_rollout", "--one-ppo-step", size, engine, workdir]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT)
    print(done.stdout.strip().splitlines()[-2], flush=True)  # the step's one-line summary
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
