"""What the two Trainer-based stages (sft, reward) share: our config -> TrainingArguments fields,
a callback that forwards logs to our trackers and marks finished checkpoints, and the output
writer (full model or LoRA adapter + tokenizer, optionally merged weights)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase, TrainerCallback

from rlhf.checkpoint import claim_checkpoints, latest_checkpoint, mark_complete
from rlhf.config import ConfigError, LoraConfig, ModelInit, OptimConfig, TrainConfig
from rlhf.distributed import whole_models
from rlhf.precision import Precision
from rlhf.registry import ModelSource, build_policy, build_scalar_model
from rlhf.tracking import Tracking


def trainer_kwargs(
    output_dir: Path,
    seed: int,
    optim: OptimConfig,
    train: TrainConfig,
    init: ModelInit,
    precision: Precision,
    progress: bool,
) -> dict:
    """TrainingArguments fields for one stage; checkpoints go to <output_dir>/checkpoints. bf16
    and use_cpu follow the stage's `precision` (see `Precision.trainer_kwargs`)."""
    if optim.min_lr_ratio > 0 and optim.scheduler != "cosine":
        raise ConfigError("optim.min_lr_ratio", "is only supported with scheduler: cosine")
    scheduler = optim.scheduler
    extra = {}
    if scheduler == "cosine" and optim.min_lr_ratio > 0:
        scheduler, extra = "cosine_with_min_lr", {"lr_scheduler_kwargs": {"min_lr_rate": optim.min_lr_ratio}}
    return dict(
        output_dir=str(output_dir / "checkpoints"),
        seed=seed,
        data_seed=seed,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        max_grad_norm=optim.max_grad_norm if optim.max_grad_norm is not None else 0.0,
        lr_scheduler_type=scheduler,
        warmup_steps=round(optim.warmup_ratio * train.max_steps),
        logging_steps=train.log_every,
        save_strategy="steps" if train.save_every else "no",
        save_steps=train.save_every or 500,
        save_total_limit=train.keep_checkpoints,
        eval_strategy="steps" if train.eval_every else "no",
        eval_steps=train.eval_every or None,
        **precision.trainer_kwargs(),  # bf16, use_cpu
        gradient_checkpointing=init.gradient_checkpointing,
        report_to="none",
        disable_tqdm=not progress,
        # The stage made its PartialState first (to know its rank before the Trainer exists);
        # without this the Trainer resets it and runs every process as if it were alone.
        accelerator_config={"use_configured_state": True},
        dataloader_drop_last=False,
        **extra,
    )


_RENAMES = {"learning_rate": "lr", "train_loss": "mean_loss"}


class TrackingCallback(TrainerCallback):
    """Forwards the Trainer's logs to our trackers under `train/<stage>/…` and `eval/<stage>/…`,
    and marks each checkpoint complete once the Trainer has written all of it."""

    def __init__(self, tracking: Tracking, stage: str):
        self.tracking, self.stage = tracking, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)):
                continue
            split, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
            metrics[f"{split}/{self.stage}/{_RENAMES.get(name, name)}"] = value
        self.tracking.log(metrics, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def resume_point(output_dir: Path, train: TrainConfig, digest: str, state) -> str | None:
    """The newest complete checkpoint to resume from (None to start afresh). Checkpoints that a
    crash cut short (no COMPLETE marker), or that another config wrote, are never resumed from;
    the main process removes them."""
    ckpt_dir = output_dir / "checkpoints"
    if state.is_main_process and claim_checkpoints(ckpt_dir, digest):
        logging.getLogger("rlhf").warning("removed checkpoints in %s written under another config", ckpt_dir)
    if state.is_main_process and ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith("checkpoint-") and not (p / "COMPLETE").is_file():
                shutil.rmtree(p, ignore_errors=True)
    state.wait_for_everyone()
    if not train.resume:
        return None
    newest = latest_checkpoint(ckpt_dir)
    return str(newest) if newest else None


def save_output(
    trainer,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    source: ModelSource,
    init: ModelInit,
    precision: Precision,
    lora: LoraConfig,
    seed: int,
    scalar_head: bool,
) -> None:
    """The stage's model directory: full weights or the LoRA adapter, the tokenizer, and with
    LoRA the base model when it was a random-init preset (no other copy exists) and, on request,
    merged weights in <output_dir>/merged."""
    trainer.save_model(str(output_dir))  # gathers ZeRO-3 shards; safetensors
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(output_dir))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.save_pretrained(str(output_dir))
    if not lora.enabled:
        return
    build = build_scalar_model if scalar_head else build_policy
    if source.path is None:
        with whole_models():
            base = build(source, init, tokenizer, lora=None, seed=seed, precision=precision)
            base.save_pretrained(str(output_dir / "base_model"))
    if lora.merge_on_save:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(str(output_dir / "merged"))
        tokenizer.save_pretrained(str(output_dir / "merged"))
