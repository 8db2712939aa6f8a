"""PPO's prompts: the training prompts (any SFT format; fresh task items by default), rendered and
limited to leave room for a response, and both held-out splits' prompts with answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf.config import PPOStageConfig
from rlhf.data import DataError, HeldOut, load_held_out, load_records
from rlhf.data.lengths import context_length
from rlhf.data.prompts import normalize_prompts
from rlhf.generation import render_prompts
from rlhf.tasks import task_records

log = logging.getLogger("rlhf.ppo")


@dataclass(kw_only=True)
class Prompts:
    prompts: list[dict]  # normalised chat prompts for training
    prompt_ids: list[list[int]]  # their rendered token ids
    eval_examples: list[dict]  # the validation split's prompts with a reference completion (in-loop evaluation)
    test_examples: list[dict]  # the test split's (eval.json's before and after; nothing else)
    train_source: str
    eval_source: str
    test_source: str

    def held_out(self) -> HeldOut:
        return HeldOut(
            validation=self.eval_examples,
            test=self.test_examples,
            validation_source=self.eval_source,
            test_source=self.test_source,
        )


def load_prompts(cfg: PPOStageConfig, tokenizer) -> Prompts:
    """Training prompts (any SFT format; fresh task items by default) and both held-out splits'
    prompts with answers."""
    train_records, train_source = load_records(
        cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", seed_offset=20)
    )
    prompts = normalize_prompts(train_records)
    held_out = load_held_out(cfg.data, cfg.task)
    eval_examples = [e for e in held_out.validation if "completion" in e]
    test_examples = [e for e in held_out.test if "completion" in e]
    log.info("prompts: %d from %s; held out: %s", len(prompts), train_source, held_out.describe())
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in prompts])
    prompts, prompt_ids = limit_prompts(prompts, prompt_ids, cfg, train_source, context_length(cfg.data, tokenizer))
    return Prompts(
        prompts=prompts,
        prompt_ids=prompt_ids,
        eval_examples=eval_examples,
        test_examples=test_examples,
        train_source=train_source,
        eval_source=held_out.validation_source,
        test_source=held_out.test_source,
    )


def limit_prompts(
    prompts: list[dict], prompt_ids: list[list[int]], cfg: PPOStageConfig, source: str, max_length: int
) -> tuple[list[dict], list[list[int]]]:
    """Prompts that leave room for a whole response within data.max_length tokens: longer ones are
    dropped or (data.overlong=truncate) cut to their last tokens, where the question and the
    assistant turn's start are. Unlimited, a long prompt ran past an absolute-position model's
    positions (an index error mid-run) and vLLM refused it."""
    limit = max_length - cfg.rollout.generation.max_new_tokens  # data.max_length, or the model's context
    over = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
    total = len(prompt_ids)
    if not over:
        return prompts, prompt_ids
    if cfg.data.overlong == "truncate":
        prompt_ids = [ids[-limit:] if len(ids) > limit else ids for ids in prompt_ids]
    else:
        keep = [i for i in range(len(prompts)) if len(prompt_ids[i]) <= limit]
        if not keep:
            raise DataError(
                source,
                None,
                f"every prompt is longer than data.max_length - rollout.generation.max_new_tokens = {limit} "
                "tokens; raise data.max_length",
            )
        prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    what = "cut to their end" if cfg.data.overlong == "truncate" else "dropped"
    log.warning("prompts: %d of %d longer than %d tokens, %s", len(over), total, limit, what)
    return prompts, prompt_ids
