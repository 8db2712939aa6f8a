"""Benchmark peer: TRL 1.16's GRPOTrainer (this environment's trl) on the set-up tools/bench_ppo.py
saves in --workdir. Prints one JSON line.

The same rollout size as our PPO: 64 completions per generation (16 prompts x num_generations=4,
per_device_train_batch_size=16 x steps_per_generation=4), 4 minibatches, num_iterations=2 (the
analogue of 2 PPO epochs), 16 new tokens (min_new_tokens=16), temperature 1. beta=0.05: a KL
penalty to a reference model (GRPOConfig's default, 0.0, would load no reference at all). Reward: the
same sequence-classification model. GRPO has no value model. Gradient clipping off. Timing:
on_step_end stamps; one update = 8 optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from rlhf.cli import setup_cpu_threads


def grpo_config(setup: dict, output_dir: str, updates: int, bf16: bool) -> GRPOConfig:
    """TRL's settings for the bench's GRPO work (`setup`: the set-up's setup.json): `updates` timed
    generations plus one warm-up. tools/bench_ppo.py's `ours_grpo` matches them (its docstring)."""
    E, G = setup["prompts_per_update"], setup["grpo_generations"]
    steps_per_update = setup["minibatches"] * setup["epochs"]
    return GRPOConfig(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,
        max_grad_norm=0.0,
        seed=0,
        learning_rate=1e-5,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_steps=steps_per_update * (updates + 1),
        per_device_train_batch_size=E // setup["minibatches"],
        gradient_accumulation_steps=1,
        steps_per_generation=setup["minibatches"],
        num_generations=G,
        num_iterations=setup["epochs"],
        max_completion_length=setup["new_tokens"],
        generation_kwargs={"min_new_tokens": setup["new_tokens"]},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=setup["kl_coef"],
        epsilon=0.2,
        mask_truncated_completions=False,
        disable_dropout=True,
        log_completions=False,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision, eager attention (as ours)")
    args = p.parse_args()

    setup_cpu_threads()
    setup = json.loads(Path(args.workdir, "setup.json").read_text())
    E, G, n_updates = setup["prompts_per_update"], setup["grpo_generations"], args.updates + 1
    steps_per_update = setup["minibatches"] * setup["epochs"]
    tok = AutoTokenizer.from_pretrained(Path(args.workdir, "policy"))
    tok.model_input_names = ["input_ids", "attention_mask"]
    # loaded from its directory, so that beta > 0 loads the reference from there too
    load = {"dtype": torch.float32, **({"attn_implementation": "eager"} if args.bf16 else {})}
    policy = AutoModelForCausalLM.from_pretrained(Path(args.workdir, "policy"), **load)  # the reference copies it
    reward = AutoModelForSequenceClassification.from_pretrained(Path(args.workdir, "reward"), **load)
    prompts = [json.loads(line)["prompt"] for line in Path(args.workdir, "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in prompts[: E // G * n_updates]]})

    with tempfile.TemporaryDirectory() as tmp:
        config = grpo_config(setup, tmp, args.updates, args.bf16)
        assert config.generation_batch_size == E
        stamps: dict[int, float] = {}

        class Timer(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                stamps[state.global_step] = time.perf_counter()

        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            reward_processing_classes=tok,
            callbacks=[Timer()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        tokens: list[int] = []
        generate_and_score = trainer._generate_and_score_completions

        def counted(*a, **k):
            out = generate_and_score(*a, **k)
            tokens.append(int(out["completion_mask"].sum()))
            return out

        trainer._generate_and_score_completions = counted
        trainer.train()

    seconds = stamps[steps_per_update * n_updates] - stamps[steps_per_update]
    episodes = E * args.updates
    print(
        json.dumps(
            {
                "episodes_per_s": episodes / seconds,
                "tokens_per_s": sum(tokens[1:]) / seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": seconds,
                "updates": args.updates,
                "episodes": episodes,
                "trl": trl.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
