"""Rollout speed of the two engines, transformers' generate (`hf`) and vLLM (`vllm`), on the same
random weights at the same precision, and one full PPO step's time split with each.

    .venv-vllm/bin/python -m tools.bench_rollout --ppo-step         # every size, then the PPO step
    .venv-vllm/bin/python -m tools.bench_rollout --sizes 1m,30m     # some sizes only
    .venv-vllm/bin/python -m tools.bench_rollout --sizes 120m --ppo-step   # the largest, and the step
    .venv-vllm/bin/python -m tools.bench_rollout --model smollm2-135m-instruct   # real weights

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

`--model NAME` (a registry preset such as smollm2-135m-instruct, a model directory or a GGUF file):
a real-weights row instead of the random sizes (add `--sizes` for both). 64 real chat prompts (open
questions, tools/bench_prompts.py, through the model's chat template with its default system
prompt) × 256 new tokens, the same sampling and counting as above, both engines at `--precision`;
the model's own end-of-turn ends a response, so `response_tokens` per engine says how many tokens
each produced. Then a greedy check on the real weights, as tests/test_vllm_real_model.py does it:
`--greedy-prompts` prompts × 32 tokens, both engines in fp32 (greedy bf16 flips near-ties), token for
token equal or not (`greedy_equal`). `--prompts` and `--new-tokens` shrink the work for a smoke run.

The last line printed is one JSON object: tokens/s per engine and size (small to large) or model,
`ratio_vllm_vs_hf` per size or model, the PPO steps' splits, and the CPU model (`lscpu`).
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
from rlhf.generation import ended_at, render_prompts
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve, stop_token_ids
from rlhf.registry.tiny import build_tiny_tokenizer
from rlhf.tracking import read_metrics
from stages.ppo import train as ppo_train
from stages.ppo.engines import HFEngine
from stages.ppo.models import PolicyAndValue
from stages.ppo.vllm_engine import VLLMEngine
from tools.bench_prompts import cpu_model, open_questions

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


def tokens_per_s(
    engine, prompts: list[list[int]], stops: tuple[int, ...], runs: int, new_tokens: int = NEW_TOKENS
) -> tuple[float, list[float], int]:
    """Median tokens/s over `runs` sampled batches, each rate, and the last batch's token count."""
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0)
    engine.generate(prompts[:4], GenerationConfig(max_new_tokens=8, do_sample=True), True)  # warm-up
    rates, tokens = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        out = engine.generate(prompts, gen, True)
        seconds = time.perf_counter() - start
        tokens = ended_at(out.response_ids, stops)[1].sum().item()  # tokens up to each stop
        rates.append(tokens / seconds)
    return statistics.median(rates), rates, tokens


def engines_row(policy, tokenizer, prompts, precision, runs: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Both engines' tokens/s on `policy` (already at `precision`'s dtype) and `prompts`."""
    stops = stop_token_ids(tokenizer, policy.generation_config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = PolicyAndValue(policy.to(accelerator.device), None)
    row = {"params": sum(p.numel() for p in policy.parameters())}
    row["hf"], row["hf_runs"], row["hf_response_tokens"] = tokens_per_s(
        HFEngine(model, tokenizer, accelerator), prompts, stops, runs, new_tokens
    )
    vllm = VLLMEngine(model, tokenizer, accelerator, precision)
    try:
        row["vllm"], row["vllm_runs"], row["vllm_response_tokens"] = tokens_per_s(
            vllm, prompts, stops, runs, new_tokens
        )
    finally:
        vllm.close()
    row["ratio_vllm_vs_hf"] = row["vllm"] / row["hf"]
    return row


def bench_size(size: str, precision_name: str, runs: int) -> dict:
    init = ModelInit(dtype="bfloat16" if precision_name == "bf16" else "float32", mixed_precision=None)
    policy = build_model(size, resolve_precision(init).dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, policy.config.vocab_size - 1, (PROMPTS, PROMPT_LEN), generator=g).tolist()
    row = engines_row(policy, build_tiny_tokenizer(), prompts, resolve_precision(init), runs)
    print(
        f"{size}: {row['params'] / 1e6:.1f}M params, hf {row['hf']:.0f} tok/s, vllm {row['vllm']:.0f} tok/s", flush=True
    )
    return row


def load_real(name: str, init: ModelInit):
    """(policy, tokenizer) of a registry name, model directory or GGUF file, as the stages load them."""
    source = resolve(name)
    tokenizer = load_tokenizer(source, init)
    return build_policy(source, init, tokenizer).eval(), tokenizer


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    return render_prompts(tokenizer, [[{"role": "user", "content": q}] for q in open_questions(n)])


def bench_model(name: str, precision_name: str, runs: int, prompts: int, new_tokens: int) -> dict:
    """The real-weights row: both engines on `name` at `precision_name`, real chat prompts."""
    init = ModelInit(dtype="bfloat16" if precision_name == "bf16" else "float32", mixed_precision=None)
    policy, tokenizer = load_real(name, init)
    ids = chat_prompts(tokenizer, prompts)
    row = engines_row(policy, tokenizer, ids, resolve_precision(init), runs, new_tokens)
    row["prompt_tokens_mean"] = sum(map(len, ids)) / len(ids)
    print(
        f"{name}: {row['params'] / 1e6:.1f}M params, {prompts} prompts x {new_tokens} new tokens, "
        f"hf {row['hf']:.0f} tok/s ({row['hf_response_tokens']} tokens), "
        f"vllm {row['vllm']:.0f} tok/s ({row['vllm_response_tokens']} tokens)",
        flush=True,
    )
    return row


def greedy_check(name: str, prompts: int, new_tokens: int = 32) -> dict:
    """vLLM's greedy tokens against the HF engine's on the real weights, in fp32 (as
    tests/test_vllm_real_model.py): equal token for token, or the prompts where they part."""
    init = ModelInit(dtype="float32", mixed_precision=None)
    policy, tokenizer = load_real(name, init)
    ids = chat_prompts(tokenizer, prompts)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = PolicyAndValue(policy.to(accelerator.device), None)
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    hf = HFEngine(model, tokenizer, accelerator).generate(ids, greedy, False)
    vllm = VLLMEngine(model, tokenizer, accelerator, resolve_precision(init))
    try:
        out = vllm.generate(ids, greedy, False)
    finally:
        vllm.close()
    differ = [i for i in range(len(ids)) if not torch.equal(hf.response_ids[i], out.response_ids[i])]
    print(f"{name}: greedy fp32, {len(ids)} prompts x {new_tokens} tokens, differing prompts {differ}", flush=True)
    return {"greedy_equal": not differ and torch.equal(hf.response_ids, out.response_ids), "greedy_differ": differ}


def ppo_step(size: str, engine: str, workdir: Path) -> dict:
    """Time split of one PPO step through the real recipe, with `engine`."""
    policy_dir = workdir / f"policy-{size}"
    if not policy_dir.exists():
        build_model(size, torch.float32).save_pretrained(policy_dir)
        build_tiny_tokenizer().save_pretrained(policy_dir)
    out = workdir / f"ppo-{engine}"
    overrides = [f"policy={policy_dir}", f"output_dir={out}", "reward_model=null", "reward.sources.rm=null"]
    overrides += ["reward.sources.subtraction={kind: rule, weight: 1.0}"]
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
    parser.add_argument(
        "--sizes", help="comma-separated, of " + ",".join(SHAPES) + " (default: all, none with --model)"
    )
    parser.add_argument("--model", help="a real-weights row: registry name, model directory or GGUF file")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="--model's prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="--model's new tokens per prompt")
    parser.add_argument("--greedy-prompts", type=int, default=4, help="--model's greedy check (0: none)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--runs", type=int, default=1, help="timed batches per engine and size")
    parser.add_argument("--ppo-step", action="store_true", help="also one PPO step per engine at the largest size")
    parser.add_argument("--one-ppo-step", nargs=3, metavar=("SIZE", "ENGINE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_ppo_step:  # the child process of ppo_step_process
        size, engine, workdir = args.one_ppo_step
        print(json.dumps(ppo_step(size, engine, Path(workdir))))
        return
    named = args.sizes if args.sizes is not None else ("" if args.model else ",".join(SHAPES))
    sizes = [s for s in SHAPES if s in named.split(",")]  # small to large
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # 64 x (~80 + 256) positions x 30 layers of SmolLM2's KV cache take ~1 GiB in fp32: the engine's default
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    result = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS} if sizes else {}  # the random sizes' work
    result.update(precision=args.precision, cpu=cpu_model())
    result["threads"] = torch.get_num_threads()
    result["tokens_per_s"] = {size: bench_size(size, args.precision, args.runs) for size in sizes}
    if args.model:
        result["model"] = {"name": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens}
        result["tokens_per_s"][args.model] = bench_model(
            args.model, args.precision, args.runs, args.prompts, args.new_tokens
        )
        if args.greedy_prompts:
            result["model"].update(greedy_check(args.model, args.greedy_prompts))
    result["ratio_vllm_vs_hf"] = {size: row["ratio_vllm_vs_hf"] for size, row in result["tokens_per_s"].items()}
    if args.ppo_step and sizes:  # at the largest random size (the recipe's step on the real model: bench_ppo)
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
