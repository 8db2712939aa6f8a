"""PPO throughput and memory, ours against TRL's, on the same models, prompts and settings.

    python launch/bench_ppo.py                 # 3 runs x 10 updates each, every trainer
    python launch/bench_ppo.py --runs 1 --updates 3 --only ours
    python launch/bench_ppo.py --precision bf16     # every trainer in bf16 mixed precision

The fixed set-up: tiny random Llama models built from a config (policy: causal LM; one
sequence-classification model as reward and value model), our tiny tokenizer, 64 prompts per
update, 16 new tokens, 4 minibatches, 2 PPO epochs, γ = 1, λ = 0.95, a fixed KL coefficient of
0.05 with k1 in the reward, no gradient clipping (TRL's PPO has none). Each run is a fresh
process: one warm-up update, then `--updates` timed ones (wall time between the end of the
warm-up update and the end of the last, everything in the loop included); peak memory is the
process's peak RSS. Medians over `--runs`.

Precision (`--precision`): fp32 (the default), or bf16 mixed precision for every trainer alike:
fp32 weights and optimizer state, matrix multiplies in bf16 under autocast, eager attention (on
CPUs with AVX512-BF16 bf16 multiplies run ~4x faster than fp32 ones, while PyTorch's CPU SDPA
backward runs slower in bf16). Ours: model_init.mixed_precision=bf16; TRL's: bf16=True and
ACCELERATE_MIXED_PRECISION=bf16 (TRL 1.12's PPO builds its own Accelerator from it).

Ours runs twice: as configured for the comparison with TRL's PPO (a separate value model, the
same work as TRL's), and with `share_policy_trunk=true` (`ours_shared`: the value head on the
policy's trunk, so the minibatch steps run one model's forward and backward, as GRPO's do). The JSON
gives both sets of ratios: `ratio_vs_*` for the first, `ratio_shared_vs_*` for the second.

Peers:
- TRL's last PPO, `trl.experimental.ppo.PPOTrainer` from trl==1.12.0, in a virtual environment
  the benchmark creates on first use (.bench/venv-trl112: the project's packages, with trl 1.12
  installed over them), as shipped and with its two gc.collect() calls per update skipped;
- TRL 1.16's GRPOTrainer from this environment, the same rollout size (16 prompts x 4
  completions = 64), 4 minibatches, 2 iterations per rollout, β = 0.05.

The last line printed is one JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_DIR = ROOT / ".bench"
PEERS = ROOT / "launch" / "bench_peers"
TRAINERS = ["ours", "ours_shared", "trl_ppo", "trl_ppo_nogc", "trl_grpo"]
SETUP = {
    "prompts_per_update": 64,
    "new_tokens": 16,
    "minibatches": 4,
    "epochs": 2,
    "kl_coef": 0.05,
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "ffn": 512,
}


def build_setup(directory: Path) -> None:
    """Save what every trainer reads: policy/, reward/ (also the value model's start),
    prompts.jsonl and setup.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.registry.tiny import build_tiny_tokenizer, tiny_vocab_size
    from rlhf.tasks.subtraction import PROMPT

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=SETUP["hidden"],
        intermediate_size=SETUP["ffn"],
        num_hidden_layers=SETUP["layers"],
        num_attention_heads=SETUP["heads"],
        num_key_value_heads=SETUP["heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        num_labels=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory / "policy")
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(directory / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(directory / name)
    rng = random.Random(0)
    prompts = directory / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for _ in range(4096):
            x, y = rng.randrange(100000), rng.randrange(100000)
            f.write(json.dumps({"prompt": PROMPT % (x, y)}, ensure_ascii=False) + "\n")
    (directory / "setup.json").write_text(json.dumps(SETUP))


def run_ours(workdir: Path, updates: int, precision: str = "fp32", shared: bool = False) -> dict:
    """Our PPO stage, in this process, on the shared set-up; `shared`: the value head on the
    policy's trunk (share_policy_trunk) instead of a second model."""
    from rlhf.config import PPOStageConfig, load_config
    from stages.ppo.train import train

    policy, reward, prompts = workdir / "policy", workdir / "reward", workdir / "prompts.jsonl"
    out = workdir / ("ours_shared" if shared else "ours")
    cfg = load_config(
        PPOStageConfig,
        ROOT / "configs/tiny/ppo.yaml",
        [
            f"policy={policy}",
            f"reward_model={reward}",
            f"share_policy_trunk={str(shared).lower()}",
            f"output_dir={out}",
            f"data.train={prompts}",
            "data.eval=null",
            "task.name=null",
            "reward.model_weight=1.0",
            "reward.rules={}",
            "reward.missing_eos_penalty=null",
            f"rollout.prompts_per_step={SETUP['prompts_per_update']}",
            f"rollout.generation.max_new_tokens={SETUP['new_tokens']}",
            "rollout.generation.temperature=1.0",
            f"ppo.epochs={SETUP['epochs']}",
            f"ppo.minibatches={SETUP['minibatches']}",
            "ppo.gamma=1.0",
            "ppo.lam=0.95",
            "ppo.kl_estimator=k1",
            f"ppo.kl_coef={SETUP['kl_coef']}",
            "ppo.kl_target=null",
            "ppo.value_warmup_steps=0",
            "optim.max_grad_norm=null",
            "value_optim.max_grad_norm=null",
            "optim.lr=1e-5",
            "value_optim.lr=1e-5",
            f"train.max_steps={updates + 1}",
            "train.eval_every=0",
            "train.save_every=0",
            "train.log_every=1",
            "tracking.report_to=[]",
            "tracking.progress=false",
            # fp32 even where the config says auto; bf16 with eager attention, as the peers get it
            f"model_init.mixed_precision={'bf16' if precision == 'bf16' else 'null'}",
            f"model_init.attn_implementation={'eager' if precision == 'bf16' else 'null'}",
        ],
    )
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/ppo/score" in r]
    seconds = steps[-1]["time"] - steps[0]["time"]  # from the end of the warm-up update to the end of the last
    timed = steps[1:]
    tokens = sum(r["train/ppo/response_length"] * SETUP["prompts_per_update"] for r in timed)
    episodes = len(timed) * SETUP["prompts_per_update"]
    return {
        "episodes_per_s": episodes / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "updates": len(timed),
        "episodes": episodes,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trl112_python() -> str:
    """The interpreter of the TRL 1.12 environment, created on first use: a venv that sees this
    environment's packages (a .pth file) and has trl==1.12.0 installed over them."""
    venv = BENCH_DIR / "venv-trl112"
    python = venv / "bin" / "python"
    if python.exists() and _trl_version(python) == "1.12.0":
        return str(python)
    print("[bench] creating .bench/venv-trl112 with trl==1.12.0 (first use only)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_project_packages.pth").write_text(ours + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, "trl==1.12.0"], check=True
    )
    assert _trl_version(python) == "1.12.0", "trl 1.12.0 does not shadow the project's trl in .bench/venv-trl112"
    return str(python)


def _trl_version(python: Path) -> str | None:
    result = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def one_run(trainer: str, updates: int, setup_dir: Path, precision: str) -> dict:
    """One fresh process per run, so each peak RSS is that trainer's alone."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_MIXED_PRECISION": "bf16" if precision == "bf16" else "no",
    }
    with tempfile.TemporaryDirectory(prefix=f"bench-{trainer}-") as tmp:
        shutil.copytree(setup_dir, tmp, dirs_exist_ok=True)
        if trainer.startswith("ours"):
            cmd = [sys.executable, __file__, "--worker", trainer, "--workdir", tmp, "--updates", str(updates)]
            cmd += ["--precision", precision]
        else:
            python = trl112_python() if trainer.startswith("trl_ppo") else sys.executable
            script = "trl_ppo.py" if trainer.startswith("trl_ppo") else "trl_grpo.py"
            cmd = [python, str(PEERS / script), "--workdir", tmp, "--updates", str(updates)]
            if trainer == "trl_ppo_nogc":
                cmd.append("--skip-gc")
            if precision == "bf16":
                cmd.append("--bf16")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--only", choices=TRAINERS, action="append")
    parser.add_argument("--worker", choices=[t for t in TRAINERS if t.startswith("ours")], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from rlhf.cli import setup_cpu_threads

        setup_cpu_threads()
        print(json.dumps(run_ours(Path(args.workdir), args.updates, args.precision, args.worker == "ours_shared")))
        return 0

    trainers = args.only or TRAINERS
    results: dict[str, list[dict]] = {t: [] for t in trainers}
    setup_dir = Path(tempfile.mkdtemp(prefix="bench-setup-"))
    build_setup(setup_dir)
    if any(t.startswith("trl_ppo") for t in trainers):
        trl112_python()  # create the TRL 1.12 environment before timing anything
    for i in range(args.runs):
        for trainer in trainers:  # interleaved, so a slow spell of the machine hits all alike
            started = time.time()
            results[trainer].append(one_run(trainer, args.updates, setup_dir, args.precision))
            r = results[trainer][-1]
            print(
                f"[bench] run {i + 1}/{args.runs} {trainer:<13} {r['episodes_per_s']:7.1f} episodes/s "
                f"{r['tokens_per_s']:8.0f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB "
                f"({time.time() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(setup_dir, ignore_errors=True)
    summary = {
        t: {k: round(statistics.median(r[k] for r in rs), 1) for k in ("episodes_per_s", "tokens_per_s", "peak_rss_mb")}
        for t, rs in results.items()
    }
    print(
        f"\n{'trainer':<14}{'episodes/s':>12}{'tokens/s':>12}{'peak RSS MB':>14}   (medians of {args.runs} runs "
        f"of {args.updates} updates, {args.precision})"
    )
    for t, s in summary.items():
        print(f"{t:<14}{s['episodes_per_s']:>12.1f}{s['tokens_per_s']:>12.0f}{s['peak_rss_mb']:>14.0f}")
    final = dict(summary)
    for ours, prefix in (("ours", "ratio"), ("ours_shared", "ratio_shared")):
        for peer in ("trl_ppo", "trl_ppo_nogc", "trl_grpo"):
            if ours in summary and peer in summary:
                final[f"{prefix}_vs_{peer}"] = round(
                    summary[ours]["episodes_per_s"] / summary[peer]["episodes_per_s"], 2
                )
    final["setup"] = {**SETUP, "precision": args.precision}
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
