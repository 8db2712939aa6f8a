"""Stage 2: the reward model — the same decoder with a scalar head, trained on chosen/rejected
pairs with the pairwise loss −log σ(r_chosen − r_rejected − m) (stages/reward/loss.py).

Read top to bottom: model -> pairs (file, or generated for the task, plus the init model's own
mistakes) -> tokens -> TRL's RewardTrainer with our loss -> save -> evaluate the saved directory
-> manifest. Launch with

    accelerate launch launch/stage2_rm.py --config configs/tiny/rm.yaml model=runs/x/sft
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import set_seed
from datasets import Dataset
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.checkpoint import finish_stage
from rlhf.config import ConfigError, RMStageConfig
from rlhf.data.lengths import context_length, limit_length, warn_overlong
from rlhf.distributed import is_zero3, process_state, wait_for_main, whole_models
from rlhf.evaluation import flatten_metrics, score_sequences
from rlhf.generation import render_prompts
from rlhf.hf_trainer import save_output, start_and_resume, train_from, trainer_kwargs
from rlhf.precision import resolve_precision
from rlhf.registry import (
    build_scalar_model,
    cast_trainable,
    config_of,
    end_of_turn_id,
    fingerprint,
    load_tokenizer,
    resolve,
)
from stages.reward.loss import pair_accuracy, pairwise_loss, response_lm_loss
from stages.reward.pairs import preference_pairs

log = logging.getLogger("rlhf.rm")


class PairwiseRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer (data collation, loop, checkpoints, DeepSpeed) with our loss function.
    The reward is the model's own pooled output: the head read at the last non-pad token. With
    lm_coef > 0 the chosen responses' language-model loss, read from the body's last hidden state
    through the tied input embeddings, is added with that weight."""

    def __init__(self, *args, lm_coef: float = 0.0, **kwargs):
        self.lm_coef = lm_coef
        if "data_collator" not in kwargs:
            kwargs["data_collator"] = PreferenceCollator(pad_token_id=kwargs["processing_class"].pad_token_id)
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "response_start"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with_lm = self.lm_coef > 0 and model.training
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            output_hidden_states=with_lm,
        )
        chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)  # (B,), (B,)
        loss = pairwise_loss(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)
        mode = "train" if model.training else "eval"
        if with_lm:
            n, start = chosen.shape[0], inputs["response_start"]
            first = int(start.min()) - 1  # the first position that predicts a response token
            hidden = outputs.hidden_states[-1][:n, first:]  # (B, T', H): chosen rows, after the final norm
            embeddings = self.accelerator.unwrap_model(model).get_input_embeddings().weight  # (V, H)
            labels = inputs["input_ids"][:n, first:].masked_fill(inputs["attention_mask"][:n, first:] == 0, -100)
            lm_loss = response_lm_loss(hidden @ embeddings.T, labels, start - first)
            loss = loss + self.lm_coef * lm_loss
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            if mode == "train":  # real tokens trained on, every process's (TRL's own compute_loss counts them)
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            if with_lm:
                self._metrics[mode]["lm_loss"].append(gather(lm_loss.detach()).mean().item())
            self._metrics[mode]["accuracy"].append(gather(pair_accuracy(chosen, rejected)).mean().item())
            self._metrics[mode]["margin"].append(gather((chosen - rejected).mean()).mean().item())
            self._metrics[mode]["chosen_score"].append(gather(chosen.mean()).mean().item())
            self._metrics[mode]["rejected_score"].append(gather(rejected.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss


class PreferenceCollator(DataCollatorForPreference):
    """TRL's collator (chosen rows, then rejected rows, right-padded), plus each pair's
    `response_start`: where the response begins in the chosen row, for the language-model loss."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        if "response_start" in examples[0]:
            batch["response_start"] = torch.tensor([e["response_start"] for e in examples])
        return batch


def train(cfg: RMStageConfig) -> dict:
    state = process_state()
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    set_seed(cfg.seed)
    started = time.time()
    out = Path(cfg.output_dir)  # not touched until training starts (step 5): a bad input leaves it as it was

    # 1. Tokenizer and the init model (usually the SFT output).
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model_init)
    if cfg.loss.lm_coef > 0:
        _check_tied_embeddings(config_of(source, cfg.model_init))

    # 2. Pairs: a file in any preference format, or generated for the task; with the task's
    #    pairs, a share of the rejected answers are the init model's own mistakes.
    pairs = preference_pairs(cfg, source, tokenizer, precision)

    # 3. Tokens: chat-rendered prompt + response + EOS, exactly the sequence PPO will score.
    # 4. TRL's RewardTrainer with our loss; the reward head starts from the init model's body.
    trainer, eval_rows, over = _reward_trainer(cfg, source, tokenizer, precision, out, pairs.train, pairs.eval)
    # the weights it starts from (an RLHF round continues the last round's RM: the manifest proves it)
    init_fingerprint = None if is_zero3(trainer.accelerator) else fingerprint(trainer.model)

    # 5. Everything loaded: take the output directory, then train, resuming from the newest
    #    complete checkpoint of this config and input if there is one.
    resume, tracking = start_and_resume(trainer, cfg, out, "rm", (cfg.model,), state)
    train_loss = train_from(trainer, resume)  # the final checkpoint: no further step

    # 6. Save a standard sequence-classification directory (adapter with LoRA) + tokenizer.
    save_output(trainer, tokenizer, out, source, cfg.model_init, precision, cfg.lora, cfg.seed, scalar_head=True)
    state.wait_for_everyone()

    # 7. Evaluate the saved directory on held-out pairs: accuracy (per kind of wrong answer),
    #    margin and the score distributions of chosen and rejected.
    metrics: dict = {"train_loss": train_loss, "overlong": over, "dropped": dict(pairs.train_dropped)}
    metrics["init_fingerprint"] = init_fingerprint
    if state.is_main_process:
        eval_report = None
        if pairs.eval:
            report = _evaluate_saved(out, cfg, tokenizer, pairs.eval, eval_rows, precision)
            eval_report = {**report, "eval_source": pairs.eval_source}
            metrics.update({k: v for k, v in report.items() if k != "scores"})
            tracking.log(_tracked(report), step=trainer.state.global_step)

        # 8. eval.json, then the manifest, written last: its presence means the directory is complete.
        finish_stage(
            out,
            cfg,
            stage="rm",
            model=cfg.model,
            base_model=source.root,
            inputs=(cfg.model,),
            metrics=metrics,
            started=started,
            eval_report=eval_report,
            extra={"data": {"train": pairs.train_source, "eval": pairs.eval_source}},
        )
    tracking.finish()
    wait_for_main()
    return metrics


def _evaluate_saved(out: Path, cfg: RMStageConfig, tokenizer, eval_pairs, eval_rows, precision) -> dict:
    """`evaluate_pairs` of the saved directory, loaded as PPO loads it."""
    saved = resolve(str(out))
    with whole_models():
        rm_tokenizer = load_tokenizer(saved, cfg.model_init)
        reward_model = build_scalar_model(saved, cfg.model_init, rm_tokenizer, precision=precision)
    return evaluate_pairs(reward_model, tokenizer, eval_pairs, eval_rows)


def _tracked(report: dict) -> dict:
    """The held-out pairs' figures as eval/rm/… metrics: accuracy (per kind of wrong answer) and margin."""
    flat = {"accuracy": report["accuracy"], "margin": report["mean_margin"]}
    flat.update({f"accuracy_{k}": v for k, v in report["accuracy_by_kind"].items()})
    return flatten_metrics(flat, "eval/rm")


def _check_tied_embeddings(config) -> None:
    """The language-model loss reads logits through the input embeddings, so the model's output
    layer must be those embeddings. Checked from the config, before any pair is mined."""
    if not config.get_text_config().tie_word_embeddings:
        raise ConfigError(
            "loss.lm_coef",
            f"needs a model whose output layer is its input embeddings (tie_word_embeddings); "
            f"{config.model_type} keeps a separate one. Set loss.lm_coef=0",
        )


def _check_not_zero3(trainer) -> None:
    """ZeRO-3 shards the embeddings, which the language-model loss reads outside the forward."""
    if is_zero3(trainer.accelerator):
        raise ConfigError("loss.lm_coef", "is not supported under DeepSpeed ZeRO-3 (sharded embeddings); use ZeRO-2")


def encode_pairs(tokenizer, pairs: list[dict], use_margin: bool) -> list[dict]:
    """{chosen_ids, rejected_ids, response_start[, margin]} per pair: the chat-rendered prompt with
    the assistant marker, then the response tokens and EOS — the same sequence a PPO rollout
    produces; response_start is the prompt's length."""
    if not pairs:
        return []
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in pairs])
    chosen = tokenizer([p["chosen"][0]["content"] for p in pairs], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([p["rejected"][0]["content"] for p in pairs], add_special_tokens=False)["input_ids"]
    end = [end_of_turn_id(tokenizer)]
    rows = []
    for p, pi, c, r in zip(pairs, prompt_ids, chosen, rejected, strict=True):
        row = {"chosen_ids": pi + c + end, "rejected_ids": pi + r + end, "response_start": len(pi)}
        if use_margin:
            row["margin"] = float(p.get("margin", 0.0))
        rows.append(row)
    return rows


def pair_accuracies(pairs: list[dict], right: list[bool]) -> dict:
    """How many pairs were ranked right (`right[i]`: pair i's chosen above its rejected), overall,
    on the task's generated kinds alone and per kind."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p, ok in zip(pairs, right, strict=True):
        by_kind[p.get("kind", "all")].append(ok)
    generated = [ok for p, ok in zip(pairs, right, strict=True) if p.get("kind") not in (None, "onpolicy")]
    return {
        "accuracy": round(sum(right) / len(right), 4),
        # the task's generated kinds of mistakes alone, without the init model's own (on-policy) ones
        "accuracy_generated": round(sum(generated) / len(generated), 4) if generated else None,
        "accuracy_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
        "n_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "n": len(right),
    }


def evaluate_pairs(model, tokenizer, pairs: list[dict], rows: list[dict]) -> dict:
    chosen = score_sequences(model, [r["chosen_ids"] for r in rows], tokenizer.pad_token_id)  # (N,)
    rejected = score_sequences(model, [r["rejected_ids"] for r in rows], tokenizer.pad_token_id)  # (N,)
    return {
        **pair_accuracies(pairs, (chosen > rejected).tolist()),
        "mean_margin": round((chosen - rejected).mean().item(), 4),
        "scores": {
            "chosen": [round(x, 4) for x in chosen.tolist()],
            "rejected": [round(x, 4) for x in rejected.tolist()],
        },
        "samples": [
            {
                "prompt": p["prompt"][-1]["content"],
                "chosen": p["chosen"][0]["content"],
                "rejected": p["rejected"][0]["content"],
                "kind": p.get("kind"),
                "chosen_score": round(c, 4),
                "rejected_score": round(r, 4),
            }
            for p, c, r in list(zip(pairs, chosen.tolist(), rejected.tolist(), strict=False))[:8]
        ],
    }


def _reward_trainer(cfg: RMStageConfig, source, tokenizer, precision, out: Path, train_pairs, eval_pairs):
    """(trainer, eval_rows, over): the pairs as tokens (over: how many were longer than
    data.max_length), and TRL's RewardTrainer with our loss on them."""
    use_margin = cfg.loss.use_margin and any("margin" in p for p in train_pairs)
    train_rows = encode_pairs(tokenizer, train_pairs, use_margin)
    max_length = context_length(cfg.data, tokenizer)
    train_set, over = limit_length(
        Dataset.from_list(train_rows), max_length, cfg.data.overlong, columns=("chosen_ids", "rejected_ids")
    )
    warn_overlong(over, len(train_rows), "pairs", max_length, cfg.data.overlong)
    eval_rows = encode_pairs(tokenizer, eval_pairs, use_margin)

    # 4. TRL's RewardTrainer with our loss; the reward head starts from the init model's body.
    model = build_scalar_model(
        source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True
    )
    args = RewardConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        max_length=None,
        center_rewards_coefficient=cfg.loss.center_coef,
        disable_dropout=True,
    )
    trainer = PairwiseRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows and cfg.train.eval_every else None,
        processing_class=tokenizer,
        lm_coef=cfg.loss.lm_coef,
    )
    # TRL casts a QLoRA model's trainable parameters to bf16 (trl/trainer/reward_trainer.py); AdamW
    # steps would round away there, so they go back to the trained dtype (rlhf/precision.py).
    cast_trainable(trainer.model, precision.trained_dtype)
    if cfg.loss.lm_coef > 0:
        _check_not_zero3(trainer)
    return trainer, eval_rows, over
