"""The prepared device check: a few PPO and GRPO steps at a real model's shape, turned into the
figures a GPU user reads first. One command, one JSON, one short table:

    python launch/gpu_check.py --out gpu.json                  # qwen2.5-0.5b-shape; < 6 min on one H100
    python launch/gpu_check.py --shape tiny-llama --steps 1 --prompts 4 --new-tokens 4   # the CPU test's

Four runs of stage 3 (stages/ppo/train.py, in this process, one after another), each on the
`--shape` preset with random weights (policy, reference, reward and value model; our tokenizer, the
subtraction task's prompts: nothing downloaded) and `--warmup` + `--steps` steps:

  ppo_lora    PPO, LoRA adapters on policy and value model; the reference is the policy without them
  ppo_full    PPO, every weight trained; a separate reference copy and value model
  ppo_shared  PPO, every weight trained, the value head on the policy's trunk
  grpo        GRPO (prompts/4 prompts x 4 samples, k3 in the loss), no value model, every weight trained

Per run, medians over the steps after the warm-up of the loop's own `perf/…` metrics
(stages/ppo/throughput.py, FLOPs from rlhf/perf.py): rollout tokens/s (responses sampled per second
of generation), train tokens/s (prompt + response tokens per second of the PPO epochs), MFU of the
whole step and of its update against the device's peak (a GPU's from rlhf/perf.py's table; a CPU's
measured), and the peak memory: torch's CUDA allocator on a GPU, the process's peak RSS on a CPU
(`memory` says which). Needs torch, transformers, accelerate, peft: not trl, datasets, deepspeed
or vLLM (tests/test_gpu_check.py runs it with them blocked)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf.config import PPOStageConfig, load_config
from rlhf.tracking import read_metrics
from stages.ppo.train import train

log = logging.getLogger("rlhf.gpu_check")
ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs/tiny/ppo.yaml"  # the subtraction task's prompts; everything sized below
VARIANTS = {
    "ppo_lora": ["lora.enabled=true"],
    "ppo_full": [],
    "ppo_shared": ["share_policy_trunk=true"],
    "grpo": [
        "rollout.samples_per_prompt=4",
        "ppo.advantage_estimator=grpo",
        "ppo.whiten_advantages=null",
        "ppo.kl_in=loss",
        "ppo.kl_estimator=k3",
        "ppo.loss_agg=token_mean",
    ],
}
FIGURES = ("rollout_tokens_per_s", "train_tokens_per_s", "mfu", "mfu_train")


def overrides(variant: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The stage-3 overrides of one run: the model and the amount of work; the loop as configured."""
    prompts = args.prompts // 4 if variant == "grpo" else args.prompts  # GRPO: the same episodes per step
    return [
        f"policy={args.shape}",
        f"reward_model={args.shape}",
        "value_model=null",
        f"output_dir={out}",
        "task.train_size=1024",
        "task.eval_size=16",
        "task.test_per_bucket=4",
        f"rollout.prompts_per_step={prompts}",
        f"rollout.generation.max_new_tokens={args.new_tokens}",
        "generation.max_new_tokens=4",  # the held-out evaluation at the end: a token count, not timed
        "ppo.epochs=1",
        f"ppo.minibatches={args.minibatches}",
        "ppo.value_warmup_steps=0",
        f"train.max_steps={args.warmup + args.steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_every=1",
        "tracking.report_to=[]",
        "tracking.progress=false",
        *VARIANTS[variant],
    ]


def run_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One stage-3 run; the medians of its timed steps' perf metrics."""
    out = workdir / variant
    cfg = load_config(PPOStageConfig, BASE, overrides(variant, args, out))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - started
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "perf/mfu" in r and r["step"] > args.warmup]
    if not steps:
        raise RuntimeError(f"{variant}: no timed step in {out / 'metrics.jsonl'}")
    result = {k: statistics.median(r[f"perf/{k}"] for r in steps) for k in FIGURES}
    memory = "perf/max_memory_allocated_gb" if "perf/max_memory_allocated_gb" in steps[-1] else "perf/max_rss_gb"
    result["peak_memory_gb"] = max(r[memory] for r in steps)
    result["memory"] = "cuda_max_allocated" if memory.endswith("allocated_gb") else "cpu_max_rss"
    result["step_s"] = statistics.median(sum(v for k, v in r.items() if k.startswith("train/ppo/time_")) for r in steps)
    result["run_s"] = seconds  # model building, steps, the final evaluation and save
    result["timed_steps"] = len(steps)
    return result


def table(results: dict) -> str:
    header = f"{'run':<12}{'rollout tok/s':>15}{'train tok/s':>13}{'MFU':>8}{'MFU train':>11}{'peak GB':>9}"
    lines = [header + f"{'s/step':>8}"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<12}failed: {r['error'][:100]}")
            continue
        lines.append(
            f"{name:<12}{r['rollout_tokens_per_s']:>15.0f}{r['train_tokens_per_s']:>13.0f}{r['mfu']:>8.1%}"
            f"{r['mfu_train']:>11.1%}{r['peak_memory_gb']:>9.2f}{r['step_s']:>8.2f}"
        )
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON written")
    parser.add_argument("--shape", default="qwen2.5-0.5b-shape", help="a registry preset (random init)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run, after --warmup")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the figures")
    parser.add_argument("--prompts", type=int, default=64, help="episodes per step (a multiple of 4 and minibatches)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per response")
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="run only these (repeatable)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = {"device": device_name(), "torch": torch.__version__, "shape": args.shape}
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "only")}
    report["results"] = results = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for variant in args.only or list(VARIANTS):
            try:
                results[variant] = run_variant(variant, args, Path(tmp))
            except Exception as e:  # one failed run (out of memory, say) leaves the others' figures
                log.exception("%s failed", variant)
                results[variant] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            print(f"[gpu_check] {variant}: {json.dumps(results[variant])}", file=sys.stderr, flush=True)
            report["seconds"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each run: a time limit keeps what ran
            gc.collect()  # the run's models, before the next one's are built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"device: {report['device']}, shape {args.shape}, {report['seconds']} s\n{table(results)}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
