"""Stage 3, the other road from SFT: DPO (Rafailov et al. 2023). No reward model, no sampling in
the loop: the policy learns from chosen/rejected pairs directly, with the loss on the log-ratios
r = log π(y|x) − log π_ref(y|x) of the two answers against the frozen SFT model (the reference),
e.g. −log σ(β(r_chosen − r_rejected)). The loss family is TRL's DPOTrainer's (`loss.type`).

Read top to bottom: the SFT model -> pairs (a file in any stage-2 format, or the task's generated
pairs plus the SFT model's own wrong samples) -> tokens -> held-out accuracy before -> TRL's
DPOTrainer against the frozen reference -> train (resuming) -> save -> held-out accuracy after
-> eval.json and the manifest. Launch with

    accelerate launch launch/stage3_dpo.py --config configs/tiny/dpo.yaml policy=runs/x/sft
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from accelerate.utils import set_seed
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rlhf.checkpoint import finish_stage
from rlhf.config import DataConfig, DPOStageConfig, to_dict
from rlhf.data import HeldOut, load_held_out
from rlhf.data.lengths import context_length, warn_overlong
from rlhf.distributed import process_state, wait_for_main
from rlhf.evaluation import before_after_report, evaluate_stage_output, summary, tracked_metrics
from rlhf.generation import render_prompts
from rlhf.hf_trainer import evaluate, save_output, start_and_resume, train_from, trainer_kwargs
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import build_policy, cast_trainable, end_of_turn_id, load_tokenizer, resolve
from stages.reward.pairs import preference_pairs

log = logging.getLogger("rlhf.dpo")


class PairDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer (collation, reference log-probs, the loss family, checkpoints, DeepSpeed)
    on pairs we tokenise ourselves (`encode_dpo_pairs`): TRL would re-render prompt + answer
    through the chat template, and its split of the two need not be the sequence the policy
    generates. TRL's RewardTrainer skips rows that already hold token ids the same way."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def train(cfg: DPOStageConfig) -> dict:
    state = process_state()
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    set_seed(cfg.seed)
    started = time.time()
    out = Path(cfg.output_dir)  # not touched until training starts (step 6): a bad input leaves it as it was

    # 1. Tokenizer of the SFT model, which is both the policy's start and the reference.
    source = resolve(cfg.policy)
    tokenizer = load_tokenizer(source, cfg.model_init)

    # 2. Pairs, exactly as stage 2 reads them: a file, or the task's generated pairs with a share
    #    of the rejected answers the SFT model's own mistakes (on-policy, as the InstructGPT
    #    labellers compared the model's own samples).
    pairs = preference_pairs(cfg, source, tokenizer, precision)
    # held-out accuracy: the task's validation split and data.test or the task's test split (data.eval holds pairs)
    held_out = load_held_out(DataConfig(test=cfg.data.test, test_split=cfg.data.test_split), cfg.task)

    # 3. Tokens: the chat-rendered prompt, then each answer and EOS (the sequence the policy writes).
    train_rows, eval_rows, over = _tokens(cfg, tokenizer, pairs)

    # 4. The SFT model's held-out accuracy, loaded from its directory as a user would (main process).
    before = _evaluate_before(cfg, held_out, precision, state)

    # 5. The policy and its frozen reference, in TRL's DPOTrainer.
    trainer = _build_trainer(cfg, source, tokenizer, precision, out, train_rows, eval_rows)

    # 6. Everything loaded: take the output directory, then train, resuming from the newest
    #    complete checkpoint of this config and input; then the held-out pairs: the share the
    #    policy's implicit reward β·r ranks right, and the margin.
    resume, tracking = start_and_resume(trainer, cfg, out, "dpo", (cfg.policy,), state)
    train_loss = train_from(trainer, resume)  # the final checkpoint: no further step
    pair_report = _evaluate_pairs(trainer) if eval_rows else None

    # 7. Save a standard Hugging Face directory (adapter with LoRA) + tokenizer.
    save_output(trainer, tokenizer, out, source, cfg.model_init, precision, cfg.lora, cfg.seed, scalar_head=False)
    state.wait_for_everyone()

    # 8. The saved policy's held-out accuracy, then eval.json and the manifest, written last.
    metrics: dict = {"train_loss": train_loss, "overlong": over, "dropped": dict(pairs.train_dropped)}
    if state.is_main_process:
        sources = {"train": pairs.train_source, "eval": pairs.eval_source, "test": held_out.test_source}
        report, after = _held_out_report(cfg, out, held_out, before, pair_report, precision, metrics)
        if after:
            tracking.log(tracked_metrics(after, "dpo"), step=trainer.state.global_step)
        finish_stage(
            out,
            cfg,
            stage="dpo",
            model=cfg.policy,
            base_model=source.root,
            inputs=(cfg.policy,),
            metrics=metrics,
            started=started,
            eval_report=report,
            extra={"data": sources, "loss": to_dict(cfg.loss)},
        )
    tracking.finish()
    wait_for_main()
    return metrics


def _tokens(cfg: DPOStageConfig, tokenizer, pairs) -> tuple[list[dict], list[dict], int]:
    """(train rows, eval rows, how many training pairs were longer than data.max_length: dropped or
    truncated as data.overlong says)."""
    max_length = context_length(cfg.data, tokenizer)  # data.max_length, or the model's context
    train_rows, over = limit_pair_length(
        encode_dpo_pairs(tokenizer, pairs.train), dataclasses.replace(cfg.data, max_length=max_length)
    )
    warn_overlong(over, len(pairs.train), "pairs", max_length, cfg.data.overlong)
    return train_rows, encode_dpo_pairs(tokenizer, pairs.eval), over


def _evaluate_before(cfg: DPOStageConfig, held_out: HeldOut, precision: Precision, state) -> dict | None:
    """The SFT model's held-out accuracy (main process; the others wait), None without held-out prompts."""
    before = None
    if (held_out.validation or held_out.test) and state.is_main_process:
        before = evaluate_stage_output(cfg.policy, cfg, held_out, precision) or None
        log.info("before DPO: %s", summary(before))
    wait_for_main()
    return before


def _build_trainer(cfg, source, tokenizer, precision: Precision, out: Path, train_rows, eval_rows):
    """The policy (trained weights in the trained dtype) and the frozen reference: a second copy of
    the SFT model, or with LoRA the policy with its adapter switched off (no second copy: the base
    weights are the SFT model)."""
    policy = build_policy(source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True)
    ref_policy = None
    if not cfg.lora.enabled:
        # in the policy's dtype: the two must score a pair the same way at step 0 (rlhf/registry build_policy)
        ref_policy = build_policy(source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision, reference=True)
        ref_policy.requires_grad_(False).eval()
    trainer = PairDPOTrainer(
        model=policy,
        ref_model=ref_policy,
        args=dpo_args(cfg, out, precision, context_length(cfg.data, tokenizer)),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    # TRL may cast a QLoRA model's trainable parameters to bf16; AdamW steps would round away
    # there, so they go back to the trained dtype (rlhf/precision.py).
    cast_trainable(trainer.model, precision.trained_dtype)
    _reference_is_adapter_off(trainer)
    return trainer


def _held_out_report(cfg, out, held_out: HeldOut, before, pair_report, precision, metrics) -> tuple[dict | None, dict]:
    """(eval.json, the evaluation after): the held-out accuracy before and after (as PPO's: the
    test split quoted, the validation split beside it, the test items DPO fixed and broke), and
    the held-out pairs."""
    if not (held_out.validation or held_out.test):
        return ({"pairs": pair_report} if pair_report else None), {}
    after = evaluate_stage_output(str(out), cfg, held_out, precision, keep=True)
    report = before_after_report(before, after, held_out.validation_source, held_out.test_source, pairs=pair_report)
    metrics.update({"before": summary(before), "after": summary(after), "pairs": pair_report})
    log.info("after DPO: %s (before: %s)", summary(after), summary(before))
    return report, after


def dpo_args(cfg: DPOStageConfig, out, precision: Precision, max_length: int) -> DPOConfig:
    """TRL's DPOConfig from ours. `loss.sft_coef` adds TRL's `sft` term (the NLL of the chosen
    answers) beside the preference loss, RPO's combination."""
    loss_type, loss_weights = [cfg.loss.type], [1.0]
    if cfg.loss.sft_coef > 0:
        loss_type, loss_weights = [cfg.loss.type, "sft"], [1.0, cfg.loss.sft_coef]
    return DPOConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        beta=cfg.loss.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=cfg.loss.label_smoothing,
        max_length=max_length,  # the collator keeps the start of over-long rows (data.overlong: truncate)
        truncation_mode="keep_start",
        disable_dropout=True,  # the policy and the reference must score a pair the same way at step 0
        pad_to_multiple_of=None,
        prediction_loss_only=True,  # held-out pairs: the loss and TRL's metrics, not every logit kept
        dataset_num_proc=None,
    )


def encode_dpo_pairs(tokenizer, pairs: list[dict]) -> list[dict]:
    """{prompt_ids, chosen_ids, rejected_ids} per pair: the chat-rendered prompt ending with the
    assistant marker, and each answer's tokens followed by the template's end of turn (EOS, or e.g.
    Gemma's `<end_of_turn>`), so that the log-probs trained are those of the sequence the policy
    generates (and that token, its decision to stop, is in the loss)."""
    if not pairs:
        return []
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in pairs])
    chosen = tokenizer([p["chosen"][0]["content"] for p in pairs], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([p["rejected"][0]["content"] for p in pairs], add_special_tokens=False)["input_ids"]
    end = [end_of_turn_id(tokenizer)]
    return [
        {"prompt_ids": pi, "chosen_ids": c + end, "rejected_ids": r + end}
        for pi, c, r in zip(prompt_ids, chosen, rejected, strict=True)
    ]


def limit_pair_length(rows: list[dict], data: DataConfig) -> tuple[list[dict], int]:
    """(rows, n_over): a pair is over-long when prompt + its longer answer exceeds data.max_length
    (set: `context_length` resolves a null one first). `drop` removes it; `truncate` keeps it for
    the collator to cut (keep the start), unless the prompt alone fills max_length and no answer
    token would be left (TRL drops those too)."""
    longest = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    over = sum(n > data.max_length for n in longest)
    if data.overlong == "drop":
        kept = [r for r, n in zip(rows, longest, strict=True) if n <= data.max_length]
    else:
        kept = [r for r in rows if len(r["prompt_ids"]) < data.max_length]
    return kept, over


def _reference_is_adapter_off(trainer: DPOTrainer) -> None:
    """With LoRA, TRL copies the policy's adapter into a frozen "ref" adapter. Ours is new (B = 0),
    so that copy is the SFT model; dropping it makes TRL switch the adapter off for the reference
    (the same log-probs, one adapter less in memory, and none saved beside the trained one)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def _evaluate_pairs(trainer: DPOTrainer) -> dict:
    """The held-out pairs under the trained policy (every process takes part)."""
    report = evaluate(trainer)
    keys = {"loss": "eval_loss", "accuracy": "eval_rewards/accuracies", "margin": "eval_rewards/margins"}
    return {name: round(report[key], 4) for name, key in keys.items() if key in report}
