"""Held-out evaluation, shared by every stage and the report.

Two held-out splits (rlhf.data.HeldOut): validation, for in-loop evaluation, the choice of a
checkpoint and any tuning, and test, which eval.json, the report and the pipeline summary quote
and nothing else reads. Tracked numbers keep them apart: `eval/<stage>/…` is the validation split
(the in-loop curve), `test/<stage>/…` the test split.

- `evaluate_generations`: greedy answers of a model to held-out prompts, scored by the task;
- `evaluate_held_out`: the same on both splits, as eval.json records one model;
- `evaluate_directory`: that for a saved stage output, loaded as a user would, plus the reward
  model's mean score of its answers;
- `AnswerMemo`: a saved model's greedy held-out answers, kept in its directory by content, so that
  the next stage's "before" (PPO's or DPO's of the SFT model) reads them instead of generating again;
- `changed_items`: the test items whose answer turned right or wrong between two evaluations;
- `evaluate_in_loop`: the validation split during training, the prompts split across processes;
- `score_sequences` / `score_responses`: the one reward-model scorer (PPO's held-out scores, the
  RM stage's pair accuracy and the reward server, rlhf/reward_server.py, all go through it);
- `flatten_metrics` / `tracked_metrics` / `summary`: a report as flat keys, or its headline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from rlhf.checkpoint import atomic_write_text, model_files_digest
from rlhf.config import GenerationConfig, ModelInit
from rlhf.data import HeldOut, reference_answer
from rlhf.distributed import whole_models
from rlhf.generation import gathered_for_generation, generate_answers, left_pad, render_prompts
from rlhf.precision import Precision
from rlhf.registry import build_policy, build_scalar_model, end_of_turn_id, load_tokenizer, resolve, sequence_scores
from rlhf.tasks import get_task, gold_checker, score_generations

log = logging.getLogger("rlhf.evaluation")

GENERATION_BATCH = 128  # prompts a held-out generate() call takes: the padding, and so the answers, follow it


@dataclass(frozen=True)
class AnswerMemo:
    """A saved model's greedy answers to held-out prompts, kept in its directory (`evaluations/`)
    under a digest of everything an answer depends on: the model's files (`model_files_digest`:
    weights, tokenizer, chat template; an adapter's base), the prompts, the generation settings, the
    loading settings and precision, the batch and the torch version. The stage that wrote the model
    stores them (`writable`); a later stage evaluating the same files the same way (PPO's and DPO's
    "before" of the SFT model) reads them instead of generating again. Anything changed is a miss,
    never a stale answer; sampled generation is never kept."""

    directory: Path
    identity: str
    writable: bool

    @classmethod
    def of(
        cls, model_dir: str | Path, gen: GenerationConfig, init: ModelInit, precision: Precision, writable: bool
    ) -> AnswerMemo | None:
        """The memo of the model saved in `model_dir` (None for sampled generation or no directory)."""
        path = Path(model_dir)
        if gen.do_sample or not path.is_dir():
            return None
        settings = {
            "model": model_files_digest(path),
            "generation": asdict(gen),
            "init": {k: v for k, v in asdict(init).items() if k != "gradient_checkpointing"},
            "precision": repr(precision),
            "batch": GENERATION_BATCH,
            "torch": torch.__version__,
        }
        return cls(path / "evaluations", json.dumps(settings, sort_keys=True, default=str), writable)

    def _file(self, prompts: Sequence[list[dict]]) -> Path:
        key = hashlib.sha256((self.identity + json.dumps(list(prompts), sort_keys=True)).encode()).hexdigest()
        return self.directory / f"answers-{key[:20]}.json"

    def load(self, prompts: Sequence[list[dict]]) -> tuple[list[str], list[list[int]]] | None:
        """(responses, sequences) as `generate_answers` gave them, or None if not kept."""
        path = self._file(prompts)
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if len(kept.get("responses", [])) != len(prompts) or len(kept.get("sequences", [])) != len(prompts):
            return None
        log.info(
            "held-out answers of %s to %d prompts: kept from an earlier evaluation (%s)",
            self.directory.parent,
            len(prompts),
            path.name,
        )
        return kept["responses"], kept["sequences"]

    def store(self, prompts: Sequence[list[dict]], responses: list[str], sequences: list[list[int]]) -> None:
        if self.writable:
            atomic_write_text(self._file(prompts), json.dumps({"responses": responses, "sequences": sequences}))


def _answers(
    model, tokenizer, prompts, gen: GenerationConfig, memo: AnswerMemo | None
) -> tuple[list[str], list[list[int]]]:
    """Greedy (or sampled) answers and their token ids: kept ones from `memo`, else generated (and kept)."""
    kept = memo.load(prompts) if memo is not None else None
    if kept is not None:
        return kept
    responses, _, sequences = generate_answers(model, tokenizer, prompts, gen, batch_size=GENERATION_BATCH)
    if memo is not None:
        memo.store(prompts, responses, sequences)
    return responses, sequences


def evaluate_generations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    task_name: str | None,
    gen: GenerationConfig,
    reward_model: torch.nn.Module | None = None,
    memo: AnswerMemo | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, items): the task's report (exact-match accuracy and its standard error, overall
    and per bucket) of the model's answers to the examples that carry a reference answer, and one
    item per such example: {"prompt" (the question), "response", "answer", "correct", "bucket"}
    (the bucket as the report keys it; None without a task). With a reward model, its mean score of
    the generated token ids as a PPO rollout reads them (`rm_score`). `memo`: where the saved
    model's answers are kept (`AnswerMemo`)."""
    scored = [e for e in examples if reference_answer(e) is not None]
    if not scored:
        return {}, []
    prompts = [e["prompt"] for e in scored]
    answers = [reference_answer(e) for e in scored]
    responses, sequences = _answers(model, tokenizer, prompts, gen, memo)
    questions = [p[-1]["content"] for p in prompts]
    metrics = score_generations(task_name, questions, answers, responses)
    if reward_model is not None:
        metrics["rm_score"] = round(score_sequences(reward_model, sequences, tokenizer.pad_token_id).mean().item(), 4)
    bucket = get_task(task_name).bucket if task_name is not None else None
    check = gold_checker(task_name)
    items = [
        {
            "prompt": q,
            "response": r,
            "answer": a,
            "correct": check(r, a),
            "bucket": str(bucket(q)) if bucket else None,
        }
        for q, r, a in zip(questions, responses, answers, strict=True)
    ]
    return metrics, items


def pick_samples(items: Sequence[dict], n: int = 8) -> list[dict]:
    """A few items to show (eval.json's `samples`): the first n / (number of buckets) of each bucket."""
    buckets = list(dict.fromkeys(i["bucket"] for i in items))
    per = max(1, n // max(len(buckets), 1))
    return [i for b in buckets for i in [i for i in items if i["bucket"] == b][:per]]


def evaluate_held_out(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: HeldOut,
    task_name: str | None,
    gen: GenerationConfig,
    reward_model: torch.nn.Module | None = None,
    memo: AnswerMemo | None = None,
) -> dict:
    """One model on both held-out splits, as eval.json records it: the test split's report at the
    top level (`split: "test"`; with no test split, the validation split's, `split: "validation"`),
    `samples` from each bucket, every answer in `items` (for `changed_items`; `for_eval_json`
    drops them) and the validation split's report under `validation`. With a reward model, its
    mean score of the answers on each split (`rm_score`). {} when neither split has answers."""
    reports = {}
    for split, examples in (("test", held_out.test), ("validation", held_out.validation)):
        scored = [e for e in examples if reference_answer(e) is not None]
        metrics, items = evaluate_generations(model, tokenizer, scored, task_name, gen, reward_model, memo)
        if not items:
            continue
        reports[split] = (metrics, items)
    if not reports:
        return {}
    quoted = "test" if "test" in reports else "validation"
    metrics, items = reports[quoted]
    out = {"split": quoted, **metrics, "samples": pick_samples(items), "items": items}
    if quoted == "test" and "validation" in reports:
        out["validation"] = reports["validation"][0]
    return out


def for_eval_json(evaluation: dict | None) -> dict | None:
    """An evaluation without its per-item answers (`items`), as eval.json keeps it."""
    return {k: v for k, v in evaluation.items() if k != "items"} if evaluation else evaluation


def before_after_report(before: dict | None, after: dict, validation_source, test_source, **extra) -> dict:
    """eval.json's held-out report of a stage that trains a model it was given (PPO, DPO, the
    preference stages): the quoted split, both evaluations, the items fixed and broken, `extra` (the
    stage's own entries, e.g. its held-out pairs), where the splits came from, and the gain."""
    report = {
        "split": after.get("split"),
        "before": for_eval_json(before),
        "after": for_eval_json(after),
        "changed": changed_items(before, after),
        **extra,
        "validation_source": validation_source,
        "test_source": test_source,
    }
    if before and "accuracy" in after:
        report["accuracy_gain"] = round(after["accuracy"] - before["accuracy"], 4)
    return report


def changed_items(before: dict | None, after: dict | None, per_bucket: int = 5) -> dict:
    """The quoted split's items whose exact match changed from `before` to `after` (two evaluations
    of the same items), per bucket: {bucket: {"n", "n_fixed", "n_broke", "fixed": [...], "broke":
    [...]}}, fixed = wrong before and right after; up to per_bucket of each, in order, with both
    answers. (n_fixed − n_broke) / n is the bucket's change in accuracy. {} if either has no items."""
    b_items, a_items = (before or {}).get("items"), (after or {}).get("items")
    if not b_items or not a_items or [i["prompt"] for i in b_items] != [i["prompt"] for i in a_items]:
        return {}
    out: dict[str, dict] = {}
    for b, a in zip(b_items, a_items, strict=True):
        entry = out.setdefault(b["bucket"] or "all", {"n": 0, "n_fixed": 0, "n_broke": 0, "fixed": [], "broke": []})
        entry["n"] += 1
        if b["correct"] == a["correct"]:
            continue
        kind = "fixed" if a["correct"] else "broke"
        entry[f"n_{kind}"] += 1
        if len(entry[kind]) < per_bucket:
            entry[kind].append(
                {"prompt": b["prompt"], "answer": b["answer"], "before": b["response"], "after": a["response"]}
            )
    return out


@torch.no_grad()
def score_sequences(
    reward_model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 256
) -> torch.Tensor:
    """The reward model's score of each token sequence (prompt + response + end of turn), read at its last
    real token. Rows are left-padded, as in a PPO rollout. -> (N,) fp32 on the CPU."""
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    scores = []
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[start : start + batch_size], pad_id, device)
            scores.append(sequence_scores(reward_model, ids, mask).float().cpu())
    finally:
        reward_model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def score_responses(
    reward_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
) -> torch.Tensor:
    """The reward model's score of each response to its chat prompt, tokenised exactly as a
    rollout is: the rendered prompt, the response tokens, the template's end of turn. -> (N,)"""
    return score_sequences(reward_model, response_rows(tokenizer, prompts, responses), tokenizer.pad_token_id)


def response_rows(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]], responses: Sequence[str]
) -> list[list[int]]:
    """The token ids `score_responses` scores: rendered chat prompt + response tokens + the token
    the template ends an assistant turn with (EOS for most; Gemma's `<end_of_turn>`, Llama 3's
    `<|eot_id|>`): where a rollout stops and the reward model was trained to be read."""
    prompt_ids = render_prompts(tokenizer, prompts)
    answers = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    end = [end_of_turn_id(tokenizer)]
    return [p + a + end for p, a in zip(prompt_ids, answers, strict=True)]


def evaluate_directory(
    policy_dir: str,
    reward_model_dir: str | None,
    held_out: HeldOut,
    task_name: str | None,
    gen: GenerationConfig,
    init: ModelInit,
    precision: Precision,
    seed: int = 0,
    keep: bool = False,
) -> dict:
    """`evaluate_held_out` of a saved policy, greedy, loaded as a user would, with the reward
    model's mean score of its answers. Main process only, plain (unsharded) models. `seed`: the
    stage's, so that a built-in preset (a random init) is the model the stage trains. Answers kept
    in the directory by an earlier evaluation of the same files are read, not generated again; `keep`
    (the stage evaluating its own output) keeps these for the next stage (`AnswerMemo`)."""
    source = resolve(policy_dir)
    tokenizer = load_tokenizer(source, init)
    with whole_models():
        policy = build_policy(source, init, tokenizer, seed=seed, precision=precision).eval()
    reward_model = None
    if reward_model_dir:
        rm_source = resolve(reward_model_dir)
        with whole_models():
            rm_tokenizer = load_tokenizer(rm_source, init)
            reward_model = build_scalar_model(rm_source, init, rm_tokenizer, precision=precision).eval()
    memo = AnswerMemo.of(policy_dir, gen, init, precision, writable=keep)
    return evaluate_held_out(policy, tokenizer, held_out, task_name, gen, reward_model, memo)


def evaluate_stage_output(policy_dir: str, cfg, held_out: HeldOut, precision: Precision, keep: bool = False) -> dict:
    """`evaluate_directory` with a stage config's task, generation, loading settings and seed, and no
    reward model (SFT's, DPO's and the preference stages' held-out evaluation of a saved policy);
    `keep`: the stage evaluates its own output, whose answers it keeps for the next stage."""
    return evaluate_directory(
        policy_dir, None, held_out, cfg.task.name, cfg.generation, cfg.model_init, precision, seed=cfg.seed, keep=keep
    )


def evaluate_in_loop(
    model, reward_model, accelerator, tokenizer, examples: list[dict], task_name: str | None, gen: GenerationConfig
) -> dict:
    """Held-out accuracy during training (`eval/ppo/…`). The prompts are split across processes
    (every process takes part, as ZeRO-3 requires); each answer travels with its item's index,
    so the padding that evens out the shards is dropped and no item is lost or counted twice."""
    indices = list(range(len(examples)))
    with accelerator.split_between_processes(indices, apply_padding=True) as shard:
        prompts = [examples[i]["prompt"] for i in shard]
        with torch.no_grad(), gathered_for_generation(model, accelerator, "policy") as unwrapped:
            responses, _, sequences = generate_answers(unwrapped.policy, tokenizer, prompts, gen)
        # the generated ids as a rollout scores them (nothing re-tokenised or appended)
        scores = score_sequences(reward_model, sequences, tokenizer.pad_token_id).tolist() if reward_model else None
    answered = {}
    for i, response, score in gather_object(
        [(i, r, scores[k] if scores else None) for k, (i, r) in enumerate(zip(shard, responses, strict=True))]
    ):
        answered[i] = (response, score)
    rows = [(examples[i], *answered[i]) for i in sorted(answered)]
    metrics = score_generations(
        task_name,
        [e["prompt"][-1]["content"] for e, _, _ in rows],
        [e["completion"][-1]["content"] for e, _, _ in rows],
        [r for _, r, _ in rows],
    )
    out = flatten_metrics(metrics, "eval/ppo")
    if "accuracy" in metrics:  # the task's checker: the gold measure beside the proxy's rm_score
        out["eval/ppo/gold_accuracy"] = metrics["accuracy"]
    if reward_model is not None:
        out["eval/ppo/rm_score"] = sum(s for _, _, s in rows) / max(len(rows), 1)
    return out


def flatten_metrics(metrics: dict, prefix: str) -> dict:
    """A task report as flat numbers under `prefix/`: accuracy, n, … and each bucket of
    `accuracy_by_<bucket>` as `accuracy_<bucket value>`."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in metrics.items():
        if key.startswith("accuracy_by_") and isinstance(value, dict):
            flat.update({f"accuracy_{b}": a for b, a in value.items()})
    return {f"{prefix}/{k}": v for k, v in flat.items()}


def tracked_metrics(evaluation: dict, stage: str) -> dict:
    """An evaluation as tracked numbers: the validation split under `eval/<stage>/` (the in-loop
    curve's last point) and the test split under `test/<stage>/`."""
    validation = evaluation.get("validation") if evaluation.get("split") == "test" else evaluation
    out = flatten_metrics(validation, f"eval/{stage}") if validation else {}
    if evaluation.get("split") == "test":
        out.update(flatten_metrics(evaluation, f"test/{stage}"))
    return out


_HEADLINE = ("split", "accuracy", "stderr", "accuracy_by_digits", "stderr_by_digits", "rm_score")


def summary(evaluation: dict | None) -> dict | None:
    """The headline of an evaluation: which split, accuracy and its standard error, per bucket, the
    reward model's mean score; and the validation split's accuracy beside the test split's."""
    if not evaluation:
        return None
    out = {k: v for k, v in evaluation.items() if k in _HEADLINE}
    if evaluation.get("validation"):
        out["validation"] = {k: v for k, v in evaluation["validation"].items() if k in _HEADLINE}
    return out
