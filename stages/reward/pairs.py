"""Preference pairs for the two stages that learn from them, the reward model (stage 2) and DPO
(the other road from SFT): a file in any preference format, or the task's generated pairs, with a
share of the rejected answers replaced by the starting model's own wrong samples (on-policy,
stages/reward/onpolicy.py). Both stages read their pairs through `preference_pairs`, so a pair
set means the same thing to both."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from rlhf.config import DPOStageConfig, RMStageConfig, TaskConfig
from rlhf.data import load_records, normalize_preferences, read_records
from rlhf.precision import Precision
from rlhf.registry import ModelSource, build_policy
from rlhf.tasks import TASKS, task_preference_records
from stages.reward.onpolicy import mine_onpolicy_pairs

log = logging.getLogger("rlhf.pairs")


@dataclass(kw_only=True)
class PreferencePairs:
    train: list[dict]  # normalised {prompt, chosen, rejected[, margin, kind]}
    eval: list[dict]  # held-out pairs, same shape (may be empty)
    train_source: str  # where they came from, with the detected format
    eval_source: str
    train_dropped: Counter  # training records dropped by the format rules, by reason


def preference_pairs(
    cfg: RMStageConfig | DPOStageConfig, source: ModelSource, tokenizer, precision: Precision
) -> PreferencePairs:
    """The stage's training and held-out pairs (`cfg.data`, `cfg.task`, `cfg.pairs`). With the
    task's pairs and `pairs.onpolicy_fraction` > 0, that share of the training pairs (and of the
    generated held-out pairs) have as rejected answer a wrong sample of the model at `source`."""
    train_pairs, train_source, train_dropped = load_pairs(cfg, "train")
    eval_pairs, eval_source, _ = load_pairs(cfg, "eval")
    if cfg.pairs.onpolicy_fraction > 0 and cfg.data.train is None:
        policy = build_policy(source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision)
        n_train = round(cfg.pairs.onpolicy_fraction * len(train_pairs))
        mined = mine_pairs(policy, tokenizer, train_pairs[len(train_pairs) - n_train :], n_train, cfg, precision)
        train_pairs = train_pairs[: len(train_pairs) - len(mined)] + mined
        if cfg.data.eval is None:
            eval_pairs += mine_pairs(
                policy, tokenizer, eval_pairs, round(cfg.pairs.onpolicy_fraction * len(eval_pairs)), cfg, precision
            )
        del policy
        log.info("on-policy pairs: %d train, %d eval", len(mined), sum(p.get("kind") == "onpolicy" for p in eval_pairs))
    # an RLHF round's comparisons (pairs.extra_*), added after mining: they are on-policy already;
    # each pairs.extra_train_repeat times, so that a round's few hundred count beside ~40,000
    repeat = cfg.pairs.extra_train_repeat
    for path in cfg.pairs.extra_train:
        extra, dropped = extra_pairs(path)
        train_pairs, train_dropped, train_source = (
            train_pairs + extra * repeat,
            train_dropped + dropped,
            f"{train_source} + {path}" + (f" x{repeat}" if repeat > 1 else ""),
        )
    for path in cfg.pairs.extra_eval:
        eval_pairs, eval_source = eval_pairs + extra_pairs(path)[0], f"{eval_source} + {path}"
    if train_dropped:
        log.warning("dropped training pairs: %s", dict(train_dropped))
    log.info(
        "train: %d pairs from %s; eval: %d pairs from %s", len(train_pairs), train_source, len(eval_pairs), eval_source
    )
    return PreferencePairs(
        train=train_pairs,
        eval=eval_pairs,
        train_source=train_source,
        eval_source=eval_source,
        train_dropped=train_dropped,
    )


def load_pairs(cfg: RMStageConfig | DPOStageConfig, split: str) -> tuple[list[dict], str, Counter]:
    """(pairs, label, dropped) for "train" or "eval": the configured file, or the task's generated pairs."""
    size = cfg.pairs.train_size if split == "train" else cfg.pairs.eval_size
    kinds = cfg.pairs.kinds or (TASKS[cfg.task.name].wrong_kinds if cfg.task.name else ())
    weights = cfg.pairs.kind_weights(kinds) if split == "train" else None
    records, label = load_records(
        cfg.data,
        cfg.task,
        split,
        generate=lambda: task_preference_records(cfg.task, kinds, size, split, weights),
    )
    if not records:
        return [], label, Counter()
    pairs, fmt, dropped = normalize_preferences(records)
    return pairs, f"{label} ({fmt})", dropped


# Room past the longest right answer when sampling the model's own: a wrong answer a digit or two
# longer (a missed borrow adds one) or a space token some tokenizers put before a number. Then one
# token for the end of turn. An answer still going after that is dropped, never mined.
ANSWER_SLACK = 4


def mining_max_new_tokens(task: TaskConfig) -> int:
    """Tokens sampled per on-policy answer: the task's longest right answer for this config, the
    slack, and the end of turn."""
    return TASKS[task.name].answer_tokens(task) + ANSWER_SLACK + 1


def extra_pairs(path: str) -> tuple[list[dict], Counter]:
    """The pairs of one `pairs.extra_train` / `extra_eval` file (any preference format), and the
    records dropped by the format rules."""
    records = read_records(path)
    if not records:  # a round whose samples all tied gives an empty file: nothing to add
        log.warning("no pairs in %s", path)
        return [], Counter()
    pairs, _fmt, dropped = normalize_preferences(records)
    log.info("%d pairs from %s", len(pairs), path)
    return pairs, dropped


def mine_pairs(
    policy, tokenizer, pairs: list[dict], wanted: int, cfg: RMStageConfig | DPOStageConfig, precision: Precision
) -> list[dict]:
    """Up to `wanted` on-policy pairs from the prompts of `pairs`, labelled by the task's checker;
    answers that never stopped are dropped (counted in the log)."""
    if wanted <= 0:
        return []
    task = TASKS[cfg.task.name]
    # sampling runs before the Trainer (and its autocast) exists: the stage's autocast, by hand
    with precision.autocast(next(policy.parameters()).device.type):
        return mine_onpolicy_pairs(
            policy,
            tokenizer,
            pairs,
            wanted,
            cfg.pairs.onpolicy_samples,
            cfg.pairs.onpolicy_temperature,
            max_new_tokens=mining_max_new_tokens(cfg.task),
            is_correct=task.is_correct,
            progress=cfg.tracking.progress,
        ).pairs
