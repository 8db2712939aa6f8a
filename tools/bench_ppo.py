"""PPO throughput and memory, ours against TRL's, on the same models, prompts and settings.

    python -m tools.bench_ppo                 # 3 runs x 10 updates each, every trainer
    python -m tools.bench_ppo --runs 1 --updates 3 --only ours
    python -m tools.bench_ppo --precision bf16     # every trainer in bf16 mixed precision
    python -m tools.bench_ppo --only trl_grpo --only ours_grpo --only ours_grpo_gae   # GRPO's work
    python -m tools.bench_ppo --model smollm2-135m-instruct --runs 1 --updates 3   # a real model

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

GRPO's work (`ours_grpo`, `ours_grpo_gae`): our same stage-3 loop with
`ppo.advantage_estimator=grpo` on exactly the work `trl_grpo` is configured for
(tools/bench_peers/trl_grpo.py; tests/test_bench_parity.py checks the two configs). Matched:
  - 16 prompts x 4 completions = 64 episodes per update (rollout.prompts_per_step=16,
    samples_per_prompt=4; TRL num_generations=4, generation_batch_size=64), the same prompts file,
    chat-templated;
  - 4 minibatches of 16 (ppo.minibatches=4; per_device_train_batch_size=16 x steps_per_generation=4),
    one optimizer step each (gradient_accumulation_steps=1, train.grad_accum=1), 2 passes per rollout
    (ppo.epochs=2; num_iterations=2): 8 optimizer steps per update;
  - advantages (r - group mean) / (group std + 1e-4), Bessel-corrected std, not whitened
    (scale_rewards=group); clipped ratio, ε = 0.2 both sides (epsilon=0.2, epsilon_high unset);
  - β = 0.05 times k3 of the current policy against the reference, in the loss (ppo.kl_in=loss,
    kl_estimator=k3; TRL beta=0.05), fixed β; a separate frozen reference loaded from policy/;
  - token-mean loss aggregation (ppo.loss_agg=token_mean; loss_type=dapo), no entropy bonus, the
    per-token entropy computed in each minibatch by both;
  - 16 new tokens at temperature 1, top-k 0, top-p 1; reward = the sequence-classification model's raw
    score (no normalisation, no EOS penalty, no truncation mask); no value model;
  - AdamW at a constant lr 1e-5, betas (0.9, 0.999), no weight decay, no gradient clipping; the same
    models and precision (fp32, or bf16 autocast with eager attention), dropout off.
Not matched (and why):
  - rollout log-probs: TRL runs one no-grad forward of the policy over the 64 episodes for its
    old_per_token_logps (it does whenever gradient_accumulation_steps is not a multiple of
    steps_per_generation x num_iterations); ours in fp32 keeps the same numbers from the sampling
    pass (rollout.logprobs_from_generation: auto) and in bf16 runs that forward too;
  - EOS: TRL's min_new_tokens=16 forbids EOS, so every completion has 16 tokens; ours has no
    min_new_tokens and a response may end at EOS (rare from the random policy): the tensors are
    padded to the longest response, 16, so each forward has the same shape, and tokens/s counts
    real tokens;
  - TRL 1.16 weights k3 by the ratio π/π_old (use_bias_correction_kl, DeepSeek-V3.2); ours is plain
    k3 (Shao et al. 2024): one elementwise product, a slightly different gradient;
  - TRL's dapo divides a minibatch's token sum by a quarter of the rollout's tokens, ours by the
    minibatch's own tokens (the same when every response has 16 tokens); TRL reuses one shuffle of
    the rollout in both passes, ours reshuffles each pass; TRL re-tokenises the decoded text for
    the reward model, ours scores the token ids.
`ours_grpo_gae` is the same work with `gae` and a separate value model (initialised from reward/,
whitened advantages, the value loss): the JSON's `critic_cost` compares it with `ours_grpo`.

Peers:
- TRL's last PPO, `trl.experimental.ppo.PPOTrainer` from trl==1.12.0, in a virtual environment
  the benchmark creates on first use (.bench/venv-trl112: the project's packages, with trl 1.12
  installed over them), as shipped and with its two gc.collect() calls per update skipped;
- TRL 1.16's GRPOTrainer from this environment, the same rollout size (16 prompts x 4
  completions = 64), 4 minibatches, 2 iterations per rollout, β = 0.05.

A real model (`--model NAME`: a registry preset such as smollm2-135m-instruct, a model directory
or a GGUF file): the policy is that model's weights (policy/ links them, with the tokenizer as our
stages prepare it: a pad distinct from EOS), the reward and value model the same trunk with a
scalar head (seed 1), the prompts real open questions (tools/bench_prompts.py) through its chat
template; every trainer fine-tunes all weights (no LoRA), at `--precision`. The same work as above
otherwise: 64 episodes and 16 new tokens per update (the questions ask for long answers, so
responses run to the limit: `tokens_per_s / episodes_per_s` gives each trainer's mean length);
`--episodes` (a multiple of 16) and `--new-tokens` shrink it for a smoke run.

FLOP utilisation: before and after the runs the bench measures this machine's matmul peak (2048 x
2048 fp32 and bf16 matrix multiplies, the best of both, at the trainers' thread count). Each
trainer's `mfu` is the model FLOPs its algorithm requires per update (2 per parameter per token for
a forward, 6 for a forward and backward, over prompt + response tokens: sampling, the reference and
reward forwards, the policy's and any value model's forward and `epochs` forward-backward passes;
attention's own FLOPs, recomputed forwards and the embedding lookup not counted) / its seconds per
update / the peak at the run's precision. `mfu_train` (ours only: TRL's trainers do not time their steps apart)
is the same for the PPO epochs alone, over their logged time.

The last line printed is one JSON object with the figures (medians; `seconds_per_update` too) and the
ratios; with `trl_grpo` and `ours_grpo`: `ratio_grpo_vs_trl_grpo` (TRL's time per update / ours)
and both peak RSS; with `ours_grpo` and `ours_grpo_gae`: `critic_cost`; `matmul_peak_gflops`, each
trainer's `mfu`, the CPU model (`lscpu`) and, with --model, the model's name under `setup`.
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

from rlhf.config import PPOStageConfig, load_config
from rlhf.perf import matmul_peak, trunk_params
from tools.bench_prompts import cpu_model, open_questions

ROOT = Path(__file__).resolve().parents[1]

BENCH_DIR = ROOT / ".bench"
TRAINERS = ["ours", "ours_shared", "trl_ppo", "trl_ppo_nogc", "trl_grpo", "ours_grpo", "ours_grpo_gae"]
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
    "grpo_generations": 4,  # the GRPO work: completions per prompt (prompts_per_update / 4 prompts)
}


def build_setup(directory: Path, model: str | None = None, setup: dict | None = None) -> None:
    """Save what every trainer reads: policy/, reward/ (also the value model's start),
    prompts.jsonl and setup.json (`setup`, SETUP by default, with the models' sizes for the FLOP
    count). `model`: a real model's weights (`build_real_setup`) instead of random tiny ones."""
    setup = {**(setup or SETUP), "model": model}
    if model:
        build_real_setup(directory, model)
    else:
        build_tiny_setup(directory)
    setup.update(model_sizes(directory))
    (directory / "setup.json").write_text(json.dumps(setup))


def build_tiny_setup(directory: Path) -> None:
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
    write_prompts(directory, [PROMPT % (rng.randrange(100000), rng.randrange(100000)) for _ in range(4096)])


def build_real_setup(directory: Path, model: str) -> None:
    """policy/: links to the model's weights and config, with the tokenizer our stages use (pad
    distinct from EOS, so every trainer's sequence-classification models find the last real token
    alike); reward/: the same trunk with a scalar head, seeded."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.config import ModelInit
    from rlhf.registry import load_tokenizer, resolve

    source = resolve(model)
    tokenizer = load_tokenizer(source, ModelInit(dtype="float32", mixed_precision=None))
    (directory / "policy").mkdir()
    for f in Path(source.path).iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "special_tokens")):
            (directory / "policy" / f.name).symlink_to(f.resolve())
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(directory / "reward")
    for name in ("policy", "reward"):
        tokenizer.save_pretrained(directory / name)
    write_prompts(directory, open_questions(4096))


def write_prompts(directory: Path, prompts: list[str]) -> None:
    with open(directory / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)


def model_sizes(directory: Path) -> dict:
    """What the FLOP count needs: the parameters a token passes through in the policy (its LM
    head's matrix included, tied or not; not the input embedding, a lookup) and in the
    sequence-classification model, and the mean chat-templated prompt length."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(directory / "policy")
    tokenizer = AutoTokenizer.from_pretrained(directory / "policy")
    prompts = [json.loads(line)["prompt"] for line in (directory / "prompts.jsonl").read_text().splitlines()[:256]]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    texts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    trunk = trunk_params(config)
    return {  # the shape of the model benched: a --model run's, not the tiny one SETUP describes
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "ffn": config.intermediate_size,
        "policy_params": trunk + config.hidden_size * config.vocab_size,  # + the LM head's matrix
        "reward_params": trunk + config.hidden_size,  # + the scalar head
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
    }


def ours_config(trainer: str, workdir: Path, updates: int, precision: str = "fp32") -> PPOStageConfig:
    """The stage-3 config of one of our trainers on the set-up saved in `workdir`: `ours` (a
    separate value model), `ours_shared` (the value head on the policy's trunk), `ours_grpo` (TRL
    GRPO's work with `ppo.advantage_estimator=grpo`) or `ours_grpo_gae` (the same work with gae and
    a value model: what the critic costs)."""
    policy, reward, prompts = workdir / "policy", workdir / "reward", workdir / "prompts.jsonl"
    saved = workdir / "setup.json"  # a --model or --episodes run's work; SETUP when none is saved
    setup = json.loads(saved.read_text()) if saved.is_file() else SETUP
    overrides = [
        f"policy={policy}",
        f"reward_model={reward}",
        f"share_policy_trunk={str(trainer == 'ours_shared').lower()}",
        f"output_dir={workdir / trainer}",
        f"data.train={prompts}",
        "data.eval=null",
        "task.name=null",
        "reward.sources={rm: {kind: model, weight: 1.0}}",  # the reward model alone
        "reward.missing_eos_penalty=null",
        f"rollout.prompts_per_step={setup['prompts_per_update']}",
        f"rollout.generation.max_new_tokens={setup['new_tokens']}",
        "rollout.generation.temperature=1.0",
        f"ppo.epochs={setup['epochs']}",
        f"ppo.minibatches={setup['minibatches']}",
        "ppo.gamma=1.0",
        "ppo.lam=0.95",
        "ppo.kl_estimator=k1",
        f"ppo.kl_coef={setup['kl_coef']}",
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
    ]
    if trainer in ("ours_grpo", "ours_grpo_gae"):
        overrides += grpo_overrides(critic=trainer == "ours_grpo_gae", setup=setup)
    return load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)


def grpo_overrides(critic: bool, setup: dict = SETUP) -> list[str]:
    """TRL GRPO's work as tools/bench_peers/trl_grpo.py configures it (the module docstring lists
    each setting). Later overrides win over the ones above."""
    G = setup["grpo_generations"]
    return [
        f"rollout.prompts_per_step={setup['prompts_per_update'] // G}",  # 16 prompts x 4 completions
        f"rollout.samples_per_prompt={G}",  # num_generations
        f"ppo.advantage_estimator={'gae' if critic else 'grpo'}",  # grpo: scale_rewards=group, std + 1e-4
        "ppo.whiten_advantages=null",  # as the estimator does it: grpo no (TRL: no), gae yes
        "ppo.kl_in=loss",  # beta * k3 in the loss, not in the reward
        "ppo.kl_estimator=k3",
        "ppo.loss_agg=token_mean",  # loss_type=dapo: token sum / the tokens of the minibatch's share
        "ppo.clip_range=0.2",  # epsilon = epsilon_high = 0.2
        "ppo.entropy_coef=0.0",
        "optim.scheduler=constant",  # lr_scheduler_type=constant
        "optim.betas=[0.9, 0.999]",  # TrainingArguments' AdamW betas
        "optim.weight_decay=0.0",
    ]


def run_ours(workdir: Path, updates: int, precision: str = "fp32", trainer: str = "ours") -> dict:
    """One of our trainers (`ours_config`), in this process, on the shared set-up."""
    from stages.ppo.train import train

    cfg = ours_config(trainer, workdir, updates, precision)
    out = Path(cfg.output_dir)
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/ppo/score" in r]
    seconds = steps[-1]["time"] - steps[0]["time"]  # from the end of the warm-up update to the end of the last
    timed = steps[1:]
    train_seconds = sum(r["train/ppo/time_train_s"] for r in timed)  # step 6, the PPO epochs
    episodes_per_update = cfg.rollout.episodes_per_step
    tokens = sum(r["train/ppo/response_length"] * episodes_per_update for r in timed)
    episodes = len(timed) * episodes_per_update
    return {
        "episodes_per_s": episodes / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "updates": len(timed),
        "episodes": episodes,
        "peak_rss_mb": _peak_rss_mb(),
        "train_seconds": train_seconds,
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
        shutil.copytree(setup_dir, tmp, symlinks=True, dirs_exist_ok=True)  # a real policy's weights stay links
        if trainer.startswith("ours"):
            cmd = [sys.executable, "-m", "tools.bench_ppo", "--worker", trainer, "--workdir", tmp]
            cmd += ["--updates", str(updates), "--precision", precision]
        else:
            python = trl112_python() if trainer.startswith("trl_ppo") else sys.executable
            peer = "trl_ppo" if trainer.startswith("trl_ppo") else "trl_grpo"
            cmd = [python, "-m", f"tools.bench_peers.{peer}", "--workdir", tmp, "--updates", str(updates)]
            if trainer == "trl_ppo_nogc":
                cmd.append("--skip-gc")
            if precision == "bf16":
                cmd.append("--bf16")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{trainer} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(summary: dict[str, dict]) -> dict:
    """The ratios of the trainers in `summary`: speed (episodes/s; the same episodes per update, so
    also the inverse ratio of seconds per update) against each peer, and what the critic costs on
    GRPO's work."""
    out: dict = {}
    for ours, prefix in (("ours", "ratio"), ("ours_shared", "ratio_shared")):
        for peer in ("trl_ppo", "trl_ppo_nogc", "trl_grpo"):
            if ours in summary and peer in summary:
                out[f"{prefix}_vs_{peer}"] = round(summary[ours]["episodes_per_s"] / summary[peer]["episodes_per_s"], 2)
    grpo, trl, gae = (summary.get(t) for t in ("ours_grpo", "trl_grpo", "ours_grpo_gae"))
    if grpo and trl:
        # TRL's time per update / ours
        out["ratio_grpo_vs_trl_grpo"] = round(trl["seconds_per_update"] / grpo["seconds_per_update"], 2)
        out["peak_rss_mb_ours_grpo"], out["peak_rss_mb_trl_grpo"] = grpo["peak_rss_mb"], trl["peak_rss_mb"]
    if grpo and gae:
        out["critic_cost"] = {
            "seconds_per_update_gae": gae["seconds_per_update"],
            "seconds_per_update_grpo": grpo["seconds_per_update"],
            "time_ratio_gae_vs_grpo": round(gae["seconds_per_update"] / grpo["seconds_per_update"], 2),
            "peak_rss_mb_gae": gae["peak_rss_mb"],
            "peak_rss_mb_grpo": grpo["peak_rss_mb"],
            "peak_rss_mb_saved": round(gae["peak_rss_mb"] - grpo["peak_rss_mb"], 1),
        }
    return out


# Which models each trainer runs besides the policy: a value model with its own trunk (trained), and
# whether the policy is trained against a reference (all do: beta > 0 or a KL penalty)
SEPARATE_CRITIC = {"ours", "trl_ppo", "trl_ppo_nogc", "ours_grpo_gae"}


def update_flops(trainer: str, setup: dict, response_tokens: float) -> dict[str, float]:
    """The model FLOPs one update of `trainer` requires (2 per parameter per token forward, 6
    forward and backward; attention's own FLOPs, recomputed forwards and embedding lookups not
    counted): `total`, and `train`, the PPO epochs alone. `response_tokens`: its mean response length."""
    E, epochs = setup["prompts_per_update"], setup["epochs"]
    tokens = E * (setup["prompt_tokens_mean"] + response_tokens)  # every pass sees prompt + response
    policy, scorer = setup["policy_params"], setup["reward_params"]
    train = 6 * policy * tokens * epochs
    forwards = 2 * policy * tokens * 2 + 2 * scorer * tokens  # sampling (KV-cached: once), reference; reward
    if trainer in SEPARATE_CRITIC:
        train += 6 * scorer * tokens * epochs
        forwards += 2 * scorer * tokens  # the value model's values for GAE
    return {"total": train + forwards, "train": train}


def mfu(trainer: str, summary: dict, setup: dict, peak_gflops: float) -> dict[str, float]:
    """`mfu` (the whole update) and, where the trainer times its PPO epochs, `mfu_train`."""
    s = summary[trainer]
    flops = update_flops(trainer, setup, s["tokens_per_s"] / s["episodes_per_s"])
    out = {"mfu": round(flops["total"] / s["seconds_per_update"] / (peak_gflops * 1e9), 4)}
    if s.get("train_seconds_per_update"):
        out["mfu_train"] = round(flops["train"] / s["train_seconds_per_update"] / (peak_gflops * 1e9), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--only", choices=TRAINERS, action="append")
    parser.add_argument("--model", help="a real model: registry name, model directory or GGUF file")
    parser.add_argument(
        "--episodes", type=int, default=SETUP["prompts_per_update"], help="per update, a multiple of 16"
    )
    parser.add_argument("--new-tokens", type=int, default=SETUP["new_tokens"])
    parser.add_argument("--worker", choices=[t for t in TRAINERS if t.startswith("ours")], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from rlhf.cli import setup_cpu_threads

        setup_cpu_threads()
        print(json.dumps(run_ours(Path(args.workdir), args.updates, args.precision, args.worker)))
        return 0

    if args.episodes <= 0 or args.episodes % (SETUP["minibatches"] * SETUP["grpo_generations"]):
        parser.error(f"--episodes must be a positive multiple of 16, got {args.episodes}")
    trainers = args.only or TRAINERS
    results: dict[str, list[dict]] = {t: [] for t in trainers}
    setup_dir = Path(tempfile.mkdtemp(prefix="bench-setup-"))
    build_setup(setup_dir, args.model, {**SETUP, "prompts_per_update": args.episodes, "new_tokens": args.new_tokens})
    setup = json.loads((setup_dir / "setup.json").read_text())
    from rlhf.cli import setup_cpu_threads

    setup_cpu_threads()  # the trainers' thread count, for the matmul peak
    import torch

    peak = matmul_peak(torch.get_num_threads())
    print(f"[bench] matmul peak at {torch.get_num_threads()} threads: {peak} GFLOP/s", file=sys.stderr, flush=True)
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
    # measured again after the runs, the best of both: a busy spell during one measurement would
    # otherwise understate the peak and overstate every MFU (above 100 % on a shared machine)
    again = matmul_peak(torch.get_num_threads())
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    summary = {
        t: {
            **{
                k: round(statistics.median(r[k] for r in rs), 1)
                for k in ("episodes_per_s", "tokens_per_s", "peak_rss_mb")
            },
            "seconds_per_update": round(statistics.median(r["seconds"] / r["updates"] for r in rs), 3),
        }
        for t, rs in results.items()
    }
    for t, rs in results.items():
        if all("train_seconds" in r for r in rs):
            summary[t]["train_seconds_per_update"] = round(
                statistics.median(r["train_seconds"] / r["updates"] for r in rs), 3
            )
        summary[t].update(mfu(t, summary, setup, peak["bf16" if args.precision == "bf16" else "fp32"]))
        if summary[t]["mfu"] > 1:
            print(f"[bench] {t}: MFU above 1, the machine was busy during the peak's measurement", file=sys.stderr)
    print(
        f"\n{'trainer':<14}{'episodes/s':>12}{'tokens/s':>12}{'peak RSS MB':>14}{'s/update':>10}{'MFU':>8}   "
        f"(medians of {args.runs} runs of {args.updates} updates, {args.precision}, {args.model or 'tiny'})"
    )
    for t, s in summary.items():
        print(
            f"{t:<14}{s['episodes_per_s']:>12.1f}{s['tokens_per_s']:>12.0f}{s['peak_rss_mb']:>14.0f}"
            f"{s['seconds_per_update']:>10.3f}{s['mfu']:>8.1%}"
        )
    final = {**summary, **ratios(summary)}
    final["setup"] = {**setup, "precision": args.precision}
    final["matmul_peak_gflops"], final["cpu"], final["threads"] = peak, cpu_model(), torch.get_num_threads()
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
