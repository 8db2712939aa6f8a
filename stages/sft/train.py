"""Stage 1: supervised fine-tuning with TRL's SFTTrainer, loss on the answer tokens only.

Read top to bottom: data -> model -> trainer -> train (resuming if a checkpoint exists) ->
save -> evaluate the saved directory by generation -> manifest. Launch with

    accelerate launch launch/stage1_sft.py --config configs/tiny/sft.yaml [key.sub=value ...]
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from accelerate.utils import set_seed
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf.checkpoint import finish_stage
from rlhf.config import SFTStageConfig
from rlhf.data import HeldOut, load_held_out, load_records, normalize_sft
from rlhf.data.lengths import context_length, limit_length, warn_overlong
from rlhf.distributed import process_state, wait_for_main
from rlhf.evaluation import evaluate_held_out, evaluate_stage_output, for_eval_json, summary, tracked_metrics
from rlhf.hf_trainer import save_output, start_and_resume, train_from, trainer_kwargs
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, cast_trainable, load_tokenizer, resolve

log = logging.getLogger("rlhf.sft")


def train(cfg: SFTStageConfig) -> dict:
    state = process_state()
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    set_seed(cfg.seed)
    started = time.time()
    out = Path(cfg.output_dir)  # not touched until training starts (step 4): a bad input leaves it as it was

    # 1. Data: read, detect the format, normalise (errors name file, line and field).
    train_records, train_source = load_records(cfg.data, cfg.task, "train")
    train_examples, fmt = normalize_sft(train_records)
    held_out = load_held_out(cfg.data, cfg.task)  # validation: the Trainer's eval loss; test: eval.json
    log.info("train: %d examples from %s (format: %s); %s", len(train_examples), train_source, fmt, held_out.describe())

    # 2. Model and tokenizer from the registry (preset, local directory or hub id).
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model_init)
    model = build_policy(source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True)
    base = _evaluate_base(cfg, model, tokenizer, held_out, state)  # with evaluate_base

    # 3. TRL's SFTTrainer. Loss on the completion for prompt/completion data, on every assistant
    #    turn for multi-turn chats; we truncate or drop over-long examples ourselves, to count them.
    trainer, over = sft_trainer(cfg, model, tokenizer, out, precision, train_examples, held_out.validation)

    # 4. Everything loaded: take the output directory, then train, resuming from the newest
    #    complete checkpoint of this config and input if there is one.
    resume, tracking = start_and_resume(trainer, cfg, out, "sft", (cfg.model,), state)
    train_loss = train_from(trainer, resume)  # the final checkpoint: no further step

    # 5. Save a standard Hugging Face directory (adapter with LoRA) + tokenizer.
    save_output(trainer, tokenizer, out, source, cfg.model_init, precision, cfg.lora, cfg.seed, scalar_head=False)
    state.wait_for_everyone()

    # 6. Evaluate what was saved, as a user would load it: the directory itself, generating
    #    greedily with the chat template. Main process only; the others wait.
    metrics: dict = {"train_loss": train_loss, "overlong": over, "format": fmt}
    if state.is_main_process:
        sources = {"train": train_source, "eval": held_out.validation_source, "test": held_out.test_source}
        evaluation = _evaluate_saved(out, cfg, held_out, precision)
        eval_report = _eval_report(evaluation, held_out, base)
        if evaluation:
            metrics.update(summary(evaluation))
            tracking.log(tracked_metrics(evaluation, "sft"), step=trainer.state.global_step)

        # 7. eval.json, then the manifest, written last: its presence means the directory is complete.
        finish_stage(
            out,
            cfg,
            stage="sft",
            model=cfg.model,
            base_model=source.root,
            inputs=(cfg.model,),
            metrics=metrics,
            started=started,
            eval_report=eval_report,
            extra={"data": sources, "format": fmt},
        )
    tracking.finish()
    wait_for_main()
    return metrics


def sft_trainer(cfg: SFTStageConfig, model, tokenizer, out: Path, precision, train_examples, eval_examples):
    """(trainer, over): TRL's SFTTrainer on our examples, and how many were longer than data.max_length."""
    multi_turn = "messages" in train_examples[0]
    args = SFTConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        max_length=None,
        completion_only_loss=None if "text" in train_examples[0] else not multi_turn,
        assistant_only_loss=multi_turn,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples and cfg.train.eval_every else None,
        processing_class=tokenizer,
    )
    # TRL casts a QLoRA model's trainable parameters to bf16 (trl/trainer/sft_trainer.py); AdamW
    # steps would round away there, so they go back to the trained dtype (rlhf/precision.py).
    cast_trainable(trainer.model, precision.trained_dtype)
    max_length = context_length(cfg.data, tokenizer)
    trainer.train_dataset, over = limit_length(trainer.train_dataset, max_length, cfg.data.overlong)
    warn_overlong(over, len(train_examples), "examples", max_length, cfg.data.overlong)
    return trainer, over


def _evaluate_base(cfg: SFTStageConfig, model, tokenizer, held_out: HeldOut, state) -> dict | None:
    """With `evaluate_base`: the base model's held-out accuracy (main process), eval.json's "base"."""
    base = None
    if cfg.evaluate_base and state.is_main_process:
        base = evaluate_held_out(model, tokenizer, held_out, cfg.task.name, cfg.generation) or None
        log.info("base model, held out: %s", summary(base))
    wait_for_main()  # the base evaluation: the others' next collective would give up on a long one
    return base


def _eval_report(evaluation: dict, held_out: HeldOut, base: dict | None) -> dict | None:
    """eval.json: the saved model's held-out evaluation with its sources and the base's; None without one."""
    if not evaluation:
        return None
    sources = {"validation_source": held_out.validation_source, "test_source": held_out.test_source}
    return {**for_eval_json(evaluation), **sources, "base": for_eval_json(base)}


def _evaluate_saved(out: Path, cfg: SFTStageConfig, held_out: HeldOut, precision) -> dict:
    """Held-out accuracy of what was saved, loaded as a user would: the directory itself, generating
    greedily with the chat template; its answers kept in `out` for the next stage's "before"
    (rlhf/evaluation.py `AnswerMemo`). {} without held-out data."""
    if not (held_out.validation or held_out.test):
        return {}
    return evaluate_stage_output(str(out), cfg, held_out, precision, keep=True)
