"""What the Trainer-based stages (sft, reward, dpo, kto, ...) share: our config -> TrainingArguments fields,
a callback that forwards logs to our trackers and marks finished checkpoints, and the output
writer (full model or LoRA adapter + tokenizer, optionally merged weights)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import trl.trainer.utils as trl_utils
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TrainerCallback

from rlhf.checkpoint import agreed_checkpoint, checkpoint_digest, mark_complete, start_stage
from rlhf.config import ConfigError, LoraConfig, ModelInit, OptimConfig, TrainConfig, to_dict
from rlhf.distributed import deepspeed_plugin, fill_zero3_sizes, whole_models
from rlhf.finite import finite_flag
from rlhf.precision import Precision
from rlhf.registry import ModelSource, build_policy, build_scalar_model, merge_lora
from rlhf.tracking import Tracking

log = logging.getLogger("rlhf")


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


class FiniteGuard(TrainerCallback):
    """Stops the run (FloatingPointError, exit code 3) at the first non-finite gradient, before
    the optimizer writes it into the weights, and at non-finite weights before any checkpoint or
    the final save: a diverged model is never saved as finished, and the last good checkpoint
    stays the newest. PPO's loop does the same, with the same check (rlhf/finite.py).
    Under DeepSpeed the gradients live in its engine, so the weights (each process's shard) are
    checked at every step instead. Every process agrees (a flag summed over processes): none waits."""

    def __init__(self, stage: str, trainer):
        self.stage, self.trainer = stage, trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
        if grads or not self.trainer.is_deepspeed_enabled:
            self._check(grads, f"gradient before optimizer step {state.global_step + 1}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:
            # DeepSpeed keeps the gradients in its engine and steps inside it; its global gradient
            # norm of the step just taken is the first sign of divergence (the weights can stay
            # finite for a while: a ZeRO-3 run at lr 1e30 reported grad_norm inf on finite weights)
            engine = getattr(self.trainer, "model_wrapped", None)
            norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            if norm is not None:
                self._check([torch.as_tensor(float(norm))], f"gradient norm at step {state.global_step}")
        if control.should_save or state.global_step >= state.max_steps or self.trainer.is_deepspeed_enabled:
            self._check(self.trainer.model.parameters(), f"weights after step {state.global_step}")

    def _check(self, tensors: Iterable[torch.Tensor], what: str) -> None:
        bad = not torch.isfinite(finite_flag(tensors)).item()
        device = self.trainer.accelerator.device
        flag = self.trainer.accelerator.reduce(torch.tensor(float(bad), device=device), "sum")
        if flag.item() > 0:
            raise FloatingPointError(
                f"{self.stage}: non-finite {what}; stopped before saving, the last complete checkpoint is kept. "
                "Lower optim.lr or check the data."
            )


class _TrainedToTheEnd(Exception):
    """Raised by `StopAtMaxSteps` to leave the Trainer's loop before its first step."""


class StopAtMaxSteps(TrainerCallback):
    """A run resumed from its final checkpoint (global step = max_steps: a crash came after the
    last checkpoint but before the manifest) must train no further. The Trainer checks max_steps
    only after a step, so a mid-epoch resume at the end would take one more step (and save
    checkpoint max_steps+1). By `on_train_begin` the Trainer has loaded the checkpoint's weights
    (into the DeepSpeed engine, under DeepSpeed), so leaving here keeps exactly them."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _TrainedToTheEnd


def train_from(trainer, resume: str | None) -> float | None:
    """`trainer.train(resume_from_checkpoint=resume)`; returns the mean training loss of the steps
    this run took, or None when `resume` is the final checkpoint (no step left: its weights are
    loaded and nothing is trained)."""
    trainer.add_callback(StopAtMaxSteps())
    plugin = deepspeed_plugin(trainer.accelerator)
    if plugin is not None:  # the config transformers finalises and DeepSpeed reads when train() starts
        fill_zero3_sizes(plugin.hf_ds_config.config, trainer.model)
    try:
        with compact_fused_lm_head():
            return trainer.train(resume_from_checkpoint=resume).training_loss
    except _TrainedToTheEnd:
        log.info("%s is the final checkpoint (step %d): nothing left to train", resume, trainer.state.global_step)
        return None


def evaluate(trainer) -> dict:
    """`trainer.evaluate()` on its eval dataset, with the fused LM head compacted as in `train_from`."""
    with compact_fused_lm_head():
        return trainer.evaluate()


@contextmanager
def compact_fused_lm_head() -> Iterator[None]:
    """TRL's fused LM head (its SFT, DPO and KTO trainers) projects through the vocabulary only the
    positions that have a label on a Triton device (CUDA, XPU), and every position elsewhere, to keep
    tile shapes fixed for compilers such as Neuron's. A CPU runs eagerly, so that is wasted work: in
    SmolLM2's SFT ~50 of 60 positions are prompt, each a 49k-vocabulary projection forward and back:
    half the step (bf16 autocast 4.2 -> 2.1 s, fp32 6.4 -> 3.8 s, loss and gradients equal to the bit;
    tools/bench_sft_step.py). While this is open, a CPU compacts too (TRL reads `_use_triton` on each
    forward; tests/test_trl_contract.py); `train_from` and `evaluate` open it."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def resume_point(output_dir: Path, train: TrainConfig, digest: str, state) -> str | None:
    """The newest complete checkpoint to resume from (None to start afresh), decided on the main
    process for all (`agreed_checkpoint`). `digest` is the stage's `checkpoint_digest`:
    checkpoints of another config or input are moved aside, ones a crash cut short removed."""
    newest = agreed_checkpoint(output_dir / "checkpoints", digest, train.resume, state.is_main_process)
    return str(newest) if newest else None


def start_and_resume(trainer, cfg, out: Path, stage: str, inputs: tuple[str | None, ...], state) -> tuple:
    """A trainer stage's step "everything loaded", the same in each: take the output directory (the
    inputs' manifests read first, for `checkpoint_digest`: a bad input leaves it as it was), find the
    checkpoint to resume from (`resume_point`), start tracking (fresh unless resuming) and add the
    tracking and non-finite callbacks. Returns (the checkpoint to resume from or None, tracking)."""
    digest = checkpoint_digest(cfg, inputs)  # reads the inputs' manifests: before the output is touched
    start_stage(out, cfg, state.is_main_process)
    resume = resume_point(out, cfg.train, digest, state)
    tracking = Tracking(cfg.tracking, out, stage, to_dict(cfg), state.is_main_process, fresh=resume is None)
    trainer.add_callback(TrackingCallback(tracking, stage))
    trainer.add_callback(FiniteGuard(stage, trainer))
    if resume:
        log.info("resuming from %s", resume)
    return resume, tracking


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
    LoRA the base model in <output_dir>/base_model when no other copy exists (a random-init preset,
    or an init that was itself an adapter, merged) and, on request, merged weights in
    <output_dir>/merged."""
    trainer.save_model(str(output_dir))  # gathers ZeRO-3 shards; safetensors
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(output_dir))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.save_pretrained(str(output_dir))
    if not lora.enabled:
        return
    # The adapter's base must be saved where no disk holds it: a random-init preset, or an init
    # that was itself an adapter over its base (LoRA RM on a LoRA SFT: the SFT model, merged). The
    # adapter names only the bare base, and loaded on it would drop the SFT's update.
    save_base = source.path is None or source.adapter is not None
    if lora.merge_on_save:  # before building the base, which can add tokens to `tokenizer`
        tokenizer.save_pretrained(str(output_dir / "merged"))
    elif not save_base:
        return  # the base is on disk already and nothing is merged
    build = build_scalar_model if scalar_head else build_policy
    with whole_models():
        base = build(source, init, tokenizer, lora=None, seed=seed, precision=precision)
    if save_base:
        base.save_pretrained(str(output_dir / "base_model"))
    if lora.merge_on_save:
        # From the adapter just saved, not the model in memory: under ZeRO-3 that one's weights are
        # partitioned across processes (merging it fails on empty shards), and merging it in place
        # would also strip the adapter from the trainer's model.
        merged = merge_lora(PeftModel.from_pretrained(base, str(output_dir)))  # fp32: as trained
        merged.save_pretrained(str(output_dir / "merged"))
