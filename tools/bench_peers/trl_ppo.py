"""Benchmark peer: TRL's last PPO, `trl.experimental.ppo.PPOTrainer` from trl==1.12.0, on the set-up
tools/bench_ppo.py saves in --workdir (policy/, reward/, prompts.jsonl). Run by bench_ppo.py in
.bench/venv-trl112 (trl 1.12 over the project's packages); prints one JSON line.

How "one update = 64 episodes, 4 minibatches, 2 PPO epochs" maps onto TRL 1.12's PPOConfig
(trl/experimental/ppo/ppo_trainer.py): per_device_train_batch_size=64 with gradient_accumulation_steps=1
and num_mini_batches=4 gives minibatches of 16 and one optimizer step each, 8 per update;
local_rollout_forward_batch_size=64; total_episodes = 64 x updates. stop_token=None makes the trainer
drop the EOS id from generation, so every response is exactly 16 tokens. Its KL is k1 in the reward
with a fixed coefficient, it never clips gradients, and it trains a separate value model (here a
copy of the reward model), as ours does. Timing: on_step_end stamps (once per update); the window
from the end of the warm-up update to the end of the last includes its two gc.collect() calls per
update (ppo_trainer.py lines 753 and 919), which --skip-gc turns into no-ops.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--skip-gc", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision, eager attention (as ours)")
    args = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.cli import setup_cpu_threads

    setup_cpu_threads()  # the same threads as ours
    setup = json.loads(Path(args.workdir, "setup.json").read_text())
    E, n_updates = setup["prompts_per_update"], args.updates + 1
    tok = AutoTokenizer.from_pretrained(Path(args.workdir, "policy"))
    tok.padding_side = "left"
    load = {"dtype": torch.float32, **({"attn_implementation": "eager"} if args.bf16 else {})}
    policy = AutoModelForCausalLM.from_pretrained(Path(args.workdir, "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(Path(args.workdir, "reward"), **load)
    ref_policy, value = copy.deepcopy(policy), copy.deepcopy(reward)
    prompts = [json.loads(line)["prompt"] for line in Path(args.workdir, "prompts.jsonl").read_text().splitlines()]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in prompts[: E * n_updates]
    ]
    dataset = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]})

    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig(
            output_dir=tmp,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            bf16=args.bf16,  # its Accelerator reads ACCELERATE_MIXED_PRECISION, which bench_ppo.py sets
            fp16=False,
            gradient_checkpointing=False,
            seed=0,
            learning_rate=1e-5,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            per_device_train_batch_size=E,
            gradient_accumulation_steps=1,
            num_mini_batches=setup["minibatches"],
            num_ppo_epochs=setup["epochs"],
            local_rollout_forward_batch_size=E,
            total_episodes=E * n_updates,
            num_sample_generations=0,
            response_length=setup["new_tokens"],
            stop_token=None,
            stop_token_id=None,
            missing_eos_penalty=None,
            temperature=1.0,
            kl_coef=setup["kl_coef"],
            kl_estimator="k1",
            gamma=1.0,
            lam=0.95,
            whiten_rewards=False,
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
        )
        stamps: dict[int, float] = {}

        class Timer(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                stamps[state.global_step] = time.perf_counter()

        trainer = PPOTrainer(
            args=config,
            processing_class=tok,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            callbacks=[Timer()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        real_collect = gc.collect
        if args.skip_gc:
            gc.collect = lambda *a, **k: 0
        try:
            trainer.train()
        finally:
            gc.collect = real_collect

    seconds = stamps[n_updates] - stamps[1]
    episodes = E * args.updates
    print(
        json.dumps(
            {
                "episodes_per_s": episodes / seconds,
                "tokens_per_s": episodes * setup["new_tokens"] / seconds,  # exactly new_tokens per response
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": seconds,
                "updates": args.updates,
                "episodes": episodes,
                "trl": trl.__version__,
                "skip_gc": args.skip_gc,
            }
        )
    )


if __name__ == "__main__":
    main()
