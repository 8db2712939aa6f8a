"""KTO (Ethayarajh et al. 2024) through TRL's KTOTrainer: each answer alone, liked or not, against
the frozen reference. Data: unpaired {prompt, completion, label} records (rlhf/data/unpaired.py),
or pairs in any preference format, each split into its liked and its disliked answer.

    accelerate launch launch/stage3_kto.py --config configs/tiny/kto.yaml policy=runs/x/sft
"""

from __future__ import annotations

import logging
import random

from trl import KTOConfig, KTOTrainer

from rlhf.config import DataConfig, KTOStageConfig
from rlhf.data import load_records
from rlhf.data.lengths import context_length
from rlhf.data.unpaired import as_unpaired, unpair
from rlhf.generation import render_prompts
from rlhf.hf_trainer import trainer_kwargs
from rlhf.precision import Precision
from rlhf.registry import end_of_turn_id
from stages.dpo.train import _reference_is_adapter_off
from stages.preference.train import Method, train_preference
from stages.reward.pairs import PreferencePairs, extra_pairs, load_pairs, preference_pairs

log = logging.getLogger("rlhf.kto")


class TokenKTOTrainer(KTOTrainer):
    """TRL's KTOTrainer (collation, reference log-probs, z0, the loss, checkpoints, DeepSpeed) on
    examples we tokenise ourselves (`encode_unpaired`), as DPO's: the sequence the policy writes.
    Only the mismatched completions for z0 are added here, as TRL's own preparation does."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL or "KL_completion_ids" in dataset.column_names:
            return dataset
        return dataset.map(
            lambda batch: {"KL_completion_ids": mismatched(batch["completion_ids"])},
            batched=True,
            batch_size=args.per_device_train_batch_size,
        )


def mismatched(completions: list) -> list:
    """KTO's z0 = KL(π‖π_ref) is estimated on answers paired with the wrong prompt (§4.1): within
    each batch, example i gets example i−1's answer (the first, the last's). [a, b, c] -> [c, a, b]."""
    return completions[-1:] + completions[:-1]


def kto_examples(cfg: KTOStageConfig, source, tokenizer, precision: Precision) -> PreferencePairs:
    """Training and held-out examples {prompt, completion, label}: a file in the unpaired format or
    any preference format, or the task's pairs (with their on-policy share, as DPO's), unpaired.
    Shuffled once with the seed: TRL's KTO reads its batches in order (z0 pairs neighbours), and a
    file of all the liked answers first would give batches of one kind."""
    if cfg.data.train is None:
        pairs = preference_pairs(cfg, source, tokenizer, precision)
        train, train_source, dropped = unpair(pairs.train), f"{pairs.train_source}, unpaired", pairs.train_dropped
        held, eval_source = unpair(pairs.eval), pairs.eval_source
    else:
        records, label = load_records(cfg.data, cfg.task, "train")
        train, fmt, dropped = as_unpaired(records)
        train_source = f"{label} ({fmt})"
        held, eval_source = _held_out_examples(cfg)
        for path in cfg.pairs.extra_train:  # an RLHF round's comparisons, as preference_pairs adds them
            train += unpair(extra_pairs(path)[0]) * cfg.pairs.extra_train_repeat
        for path in cfg.pairs.extra_eval:
            held += unpair(extra_pairs(path)[0])
    random.Random(cfg.seed).shuffle(train)
    liked = sum(e["label"] for e in train)
    log.info("train: %d liked, %d disliked answers from %s", liked, len(train) - liked, train_source)
    return PreferencePairs(
        train=train, eval=held, train_source=train_source, eval_source=eval_source, train_dropped=dropped
    )


def _held_out_examples(cfg: KTOStageConfig) -> tuple[list[dict], str]:
    if cfg.data.eval is None:  # the task's held-out pairs (none without a task)
        pairs, label, _ = load_pairs(cfg, "eval")
        return unpair(pairs), label
    records, label = load_records(cfg.data, cfg.task, "eval")
    examples, fmt, _ = as_unpaired(records)
    return examples, f"{label} ({fmt})"


def encode_unpaired(tokenizer, examples: list[dict]) -> list[dict]:
    """{prompt_ids, completion_ids, label} per example: the chat-rendered prompt ending with the
    assistant marker, the answer's tokens and the template's end of turn (as `encode_dpo_pairs`)."""
    if not examples:
        return []
    prompt_ids = render_prompts(tokenizer, [e["prompt"] for e in examples])
    answers = tokenizer([e["completion"][0]["content"] for e in examples], add_special_tokens=False)["input_ids"]
    end = [end_of_turn_id(tokenizer)]
    return [
        {"prompt_ids": p, "completion_ids": a + end, "label": e["label"]}
        for p, a, e in zip(prompt_ids, answers, examples, strict=True)
    ]


def limit_unpaired_length(rows: list[dict], data: DataConfig) -> tuple[list[dict], int]:
    """(rows, n_over) as `limit_pair_length`: `drop` removes an example longer than data.max_length;
    `truncate` leaves it for the collator to cut (keep the start) unless the prompt fills it."""
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    over = sum(n > data.max_length for n in lengths)
    if data.overlong == "drop":
        return [r for r, n in zip(rows, lengths, strict=True) if n <= data.max_length], over
    return [r for r in rows if len(r["prompt_ids"]) < data.max_length], over


def kto_args(cfg: KTOStageConfig, out, precision: Precision, max_length: int) -> KTOConfig:
    return KTOConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        beta=cfg.loss.beta,
        loss_type=cfg.loss.type,
        desirable_weight=cfg.loss.desirable_weight,
        undesirable_weight=cfg.loss.undesirable_weight,
        max_length=max_length,  # the collator keeps the start of over-long rows (data.overlong: truncate)
        disable_dropout=True,  # the policy and the reference must score an answer the same way at step 0
        prediction_loss_only=True,
        dataset_num_proc=None,
    )


def build_kto_trainer(cfg, policy, ref_policy, tokenizer, out, precision, train_ds, eval_ds) -> KTOTrainer:
    trainer = TokenKTOTrainer(
        model=policy,
        ref_model=ref_policy,
        args=kto_args(cfg, out, precision, context_length(cfg.data, tokenizer)),  # null: the model's context
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    _reference_is_adapter_off(trainer)  # with LoRA, as DPO's: the adapter off is the reference
    return trainer


KTO = Method(
    name="kto",
    load=kto_examples,
    encode=encode_unpaired,
    limit=limit_unpaired_length,
    build_trainer=build_kto_trainer,
    reference=True,
    pair_keys=(
        ("loss", "eval_loss"),
        ("margin", "eval_rewards/margins"),  # mean β·log-ratio of the liked answers − of the disliked
        ("chosen_logp", "eval_logps/chosen"),
        ("rejected_logp", "eval_logps/rejected"),
        ("kl", "eval_kl"),  # z0
    ),
)


def train(cfg: KTOStageConfig) -> dict:
    """Stage 3 by KTO: unpaired thumbs-up/down data (or pairs) against the frozen SFT model."""
    return train_preference(cfg, KTO)
