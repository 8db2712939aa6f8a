"""One SFT training step (forward + backward through TRL's SFTTrainer) with TRL's fused LM head as
it ships against ours (`compact_fused_lm_head`, rlhf/hf_trainer.py), on the same batch in one
invocation: seconds per step, the ratio, and whether the loss and gradients agree.

    python -m tools.bench_sft_step                                        # SmolLM2 (configs/smollm2-135m/sft.yaml)
    python -m tools.bench_sft_step --config configs/tiny/sft.yaml --repeats 5
    python -m tools.bench_sft_step model_init.mixed_precision=null        # fp32, as on a CPU without bf16

On a CPU TRL projects every position through the vocabulary (it compacts to the labelled ones on
Triton devices only); ours compacts there too. The two are timed alternately, after one warm-up
step each, and the fastest of `--repeats` is kept. Ends with one JSON line: `s_per_step_trl`,
`s_per_step_ours`, `ratio_ours_vs_trl`, `max_abs_grad_diff`, the CPU model.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from rlhf.config import SFTStageConfig, load_config
from rlhf.data import load_records, normalize_sft
from rlhf.distributed import process_state
from rlhf.hf_trainer import compact_fused_lm_head
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from stages.sft.train import sft_trainer
from tools.bench_prompts import cpu_model


def stage_trainer(config: str, overrides: list[str], workdir: Path):
    """(trainer, precision): the SFT stage's own trainer, built as the stage builds it, on the first
    four batches of the config's training examples."""
    cfg = load_config(SFTStageConfig, config, [f"output_dir={workdir}", "train.eval_every=0", *overrides])
    process_state()
    precision = resolve_precision(cfg.model_init)
    records, _ = load_records(cfg.data, cfg.task, "train")
    examples, _ = normalize_sft(records)
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model_init)
    model = build_policy(source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True)
    trainer, _ = sft_trainer(cfg, model, tokenizer, workdir, precision, examples[: 4 * cfg.train.batch_size], [])
    return trainer, precision


def step(trainer, batch: dict, compact: bool, precision) -> tuple[float, torch.Tensor, float]:
    """(loss, flat gradient, seconds) of one forward + backward on `batch`, the forward under the
    stage's autocast (accelerate adds its own only once train() prepares the model)."""
    trainer.model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    with compact_fused_lm_head() if compact else nullcontext():
        with precision.autocast(trainer.model.device.type):  # the forward only, as the Trainer's training_step
            loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    seconds = time.perf_counter() - started
    grads = torch.cat([p.grad.flatten().float() for p in trainer.model.parameters() if p.grad is not None])
    return loss.item(), grads, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2-135m/sft.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="key.sub=value, as a stage takes them")
    args = parser.parse_args()
    with TemporaryDirectory() as workdir:
        trainer, precision = stage_trainer(args.config, args.overrides, Path(workdir))
        batch = next(iter(trainer.get_train_dataloader()))
        times: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for compact in [False, True] + [False, True] * args.repeats:  # the first pair warms up
            results[compact] = step(trainer, batch, compact, precision)
            times[compact].append(results[compact][2])
    trl, ours = min(times[False][1:]), min(times[True][1:])
    out = {
        "config": args.config,
        "overrides": args.overrides,
        "batch": list(batch["input_ids"].shape),
        "labelled_positions": int((batch["labels"][:, 1:] != -100).sum()),
        "mixed_precision": precision.mixed,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "native_bf16": precision.native_bf16,
        "s_per_step_trl": round(trl, 3),
        "s_per_step_ours": round(ours, 3),
        "ratio_ours_vs_trl": round(trl / ours, 2),
        "loss_trl": results[False][0],
        "loss_ours": results[True][0],
        "max_abs_grad_diff": (results[True][1] - results[False][1]).abs().max().item(),
    }
    print(f"SFT step, TRL's fused head {trl:.2f} s, ours (compacted) {ours:.2f} s: {trl / ours:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
