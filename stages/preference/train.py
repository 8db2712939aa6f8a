"""Stage 3 by the other preference methods, beside DPO (stages/dpo/train.py): KTO, ORPO and
CPO/SimPO, each through TRL's trainer. One recipe; a method (stages/preference/{kto,orpo,cpo}.py)
says how its examples are read and tokenised and builds its TRL trainer.

Read top to bottom, as DPO's: the starting model -> examples (a file, or the task's generated
pairs) -> tokens -> held-out accuracy before -> the method's TRL trainer -> held-out pairs before
-> train (resuming) -> held-out pairs after -> save -> held-out accuracy after -> eval.json and
the manifest. Launch with

    accelerate launch launch/stage3_kto.py --config configs/tiny/kto.yaml policy=runs/x/sft
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from datasets import Dataset

from rlhf.checkpoint import finish_stage
from rlhf.config import DataConfig, to_dict
from rlhf.data import DataError, HeldOut, load_held_out
from rlhf.data.lengths import context_length, warn_overlong
from rlhf.distributed import process_state
from rlhf.evaluation import before_after_report, evaluate_stage_output, summary, tracked_metrics
from rlhf.hf_trainer import evaluate, save_output, start_and_resume, train_from
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import build_policy, cast_trainable, load_tokenizer, resolve
from stages.reward.pairs import PreferencePairs

log = logging.getLogger("rlhf.preference")


@dataclass(frozen=True, kw_only=True)
class Method:
    """What differs between the preference methods; the recipe below is the rest."""

    name: str  # the stage: train/<name>/… metrics, the manifest's `stage`, the logs
    # (cfg, source, tokenizer, precision) -> training and held-out examples (pairs, or KTO's unpaired)
    load: Callable[..., PreferencePairs]
    encode: Callable[[object, list[dict]], list[dict]]  # (tokenizer, examples) -> rows of token ids
    limit: Callable[[list[dict], DataConfig], tuple[list[dict], int]]  # (rows, data) -> (rows, n over-long)
    # (cfg, policy, ref_policy | None, tokenizer, out, precision, train Dataset, eval Dataset | None) -> trainer
    build_trainer: Callable
    reference: bool  # a frozen reference model is kept (KTO); ORPO and CPO/SimPO need none
    # the trainer's evaluate() keys -> ours in eval.json "pairs"
    pair_keys: tuple[tuple[str, str], ...] = (
        ("loss", "eval_loss"),
        ("accuracy", "eval_rewards/accuracies"),
        ("margin", "eval_rewards/margins"),
        ("chosen_logp", "eval_logps/chosen"),
        ("rejected_logp", "eval_logps/rejected"),
    )


def train_preference(cfg, method: Method) -> dict:
    state = process_state()
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    set_seed(cfg.seed)
    started = time.time()
    out = Path(cfg.output_dir)  # not touched until training starts (step 6): a bad input leaves it as it was

    # 1. Tokenizer of the starting model.
    source = resolve(cfg.policy)
    tokenizer = load_tokenizer(source, cfg.model_init)

    # 2. Examples: a file (its format told from the first record), or the task's generated pairs
    #    with a share of on-policy mistakes, as DPO and stage 2 read them.
    examples = method.load(cfg, source, tokenizer, precision)
    held_out = load_held_out(DataConfig(test=cfg.data.test, test_split=cfg.data.test_split), cfg.task)

    # 3. Tokens: the chat-rendered prompt, then each answer and the end of turn (what the policy writes).
    data = dataclasses.replace(cfg.data, max_length=context_length(cfg.data, tokenizer))  # null: the model's context
    train_rows, over = method.limit(method.encode(tokenizer, examples.train), data)
    warn_overlong(over, len(examples.train), "examples", data.max_length, data.overlong)
    if not train_rows:
        raise DataError(examples.train_source, None, f"no example fits data.max_length={data.max_length}")
    eval_rows = method.limit(method.encode(tokenizer, examples.eval), data)[0] if examples.eval else []

    # 4. The starting model's held-out accuracy, loaded from its directory as a user would (main process).
    before = None
    if (held_out.validation or held_out.test) and state.is_main_process:
        before = evaluate_stage_output(cfg.policy, cfg, held_out, precision) or None
        log.info("before %s: %s", method.name, summary(before))
    state.wait_for_everyone()

    # 5. The policy (and the frozen reference, for a method that keeps one) in the method's trainer.
    trainer = _build_trainer(cfg, method, source, tokenizer, precision, out, train_rows, eval_rows)

    # 6. Everything loaded: take the output directory, then train, resuming from the newest complete
    #    checkpoint of this config and input. The held-out examples are scored before and after.
    resume, tracking = start_and_resume(trainer, cfg, out, method.name, (cfg.policy,), state)
    pairs_before = _evaluate_pairs(trainer, method) if eval_rows and resume is None else None
    train_loss = train_from(trainer, resume)  # the final checkpoint: no further step
    pairs_after = _evaluate_pairs(trainer, method) if eval_rows else None

    # 7. Save a standard Hugging Face directory (adapter with LoRA) + tokenizer.
    save_output(trainer, tokenizer, out, source, cfg.model_init, precision, cfg.lora, cfg.seed, scalar_head=False)
    state.wait_for_everyone()

    # 8. The saved policy's held-out accuracy, then eval.json and the manifest, written last.
    metrics: dict = {"train_loss": train_loss, "overlong": over, "dropped": dict(examples.train_dropped)}
    if state.is_main_process:
        sources = {"train": examples.train_source, "eval": examples.eval_source, "test": held_out.test_source}
        pairs = {"before": pairs_before, "after": pairs_after} if pairs_after else None
        report, after = _held_out_report(cfg, method, out, held_out, before, pairs, precision, metrics)
        if after:
            tracking.log(tracked_metrics(after, method.name), step=trainer.state.global_step)
        finish_stage(
            out,
            cfg,
            stage=method.name,
            model=cfg.policy,
            base_model=source.root,
            inputs=(cfg.policy,),
            metrics=metrics,
            started=started,
            eval_report=report,
            extra={"data": sources, "loss": to_dict(cfg.loss)},
        )
    tracking.finish()
    state.wait_for_everyone()
    return metrics


def _build_trainer(cfg, method: Method, source, tokenizer, precision: Precision, out: Path, train_rows, eval_rows):
    """The policy in the trained dtype and, for a method with a reference, a second frozen copy of
    the starting model (with LoRA none: the policy with its adapter off is the reference)."""
    policy = build_policy(source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True)
    ref_policy = None
    if method.reference and not cfg.lora.enabled:
        ref_policy = build_policy(source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision)
        ref_policy.requires_grad_(False).eval()
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    trainer = method.build_trainer(cfg, policy, ref_policy, tokenizer, out, precision, train_ds, eval_ds)
    # TRL may cast a QLoRA model's trainable parameters to bf16; AdamW steps would round away
    # there, so they go back to the trained dtype (rlhf/precision.py).
    cast_trainable(trainer.model, precision.trained_dtype)
    return trainer


def _evaluate_pairs(trainer, method: Method) -> dict:
    """The held-out examples under the policy now (every process takes part): the loss, and the
    method's implicit rewards of the chosen and rejected answers (their margin; for paired data
    the share ranked right) and the answers' summed log-probs."""
    report = evaluate(trainer)
    return {name: round(report[key], 4) for name, key in method.pair_keys if key in report}


def _held_out_report(
    cfg, method, out, held_out: HeldOut, before, pairs, precision, metrics
) -> tuple[dict | None, dict]:
    """(eval.json, the evaluation after): the held-out accuracy before and after (the test split
    quoted, the validation split beside it, the items fixed and broken), and the held-out pairs."""
    if pairs:
        metrics["pairs"] = pairs
    if not (held_out.validation or held_out.test):
        return ({"pairs": pairs} if pairs else None), {}
    after = evaluate_stage_output(str(out), cfg, held_out, precision, keep=True)
    report = before_after_report(before, after, held_out.validation_source, held_out.test_source, pairs=pairs)
    metrics.update({"before": summary(before), "after": summary(after)})
    log.info("after %s: %s (before: %s)", method.name, summary(after), summary(before))
    return report, after
