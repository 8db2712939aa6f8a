"""Held-out evaluation, shared by every stage and the report.

- `evaluate_generations`: greedy answers of a model to held-out prompts, scored by the task;
- `evaluate_directory`: the same for a saved stage output, loaded as a user would, plus the
  reward model's mean score of its answers;
- `evaluate_in_loop`: the same during training, the prompts split across processes;
- `score_sequences` / `score_responses`: the one reward-model scorer (PPO's held-out scores, the
  RM stage's pair accuracy and the reward server, rlhf/reward_server.py, all go through it);
- `flatten_metrics` / `summary`: a task report as flat `eval/<stage>/…` keys, or its headline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig, ModelInit
from rlhf.data import reference_answer
from rlhf.distributed import whole_models
from rlhf.generation import gathered_for_generation, generate_text, left_pad, render_prompts
from rlhf.precision import Precision
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve, sequence_scores
from rlhf.tasks import score_generations


def evaluate_generations(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    task_name: str | None,
    gen: GenerationConfig,
    n_samples: int = 8,
) -> tuple[dict, list[dict]]:
    """(metrics, samples): the task's report (exact-match accuracy, per bucket) of the model's
    answers to examples that carry a reference answer, and a few examples to show."""
    scored = [e for e in examples if reference_answer(e) is not None]
    if not scored:
        return {}, []
    prompts = [e["prompt"] for e in scored]
    answers = [reference_answer(e) for e in scored]
    responses = generate_text(model, tokenizer, prompts, gen)
    questions = [p[-1]["content"] for p in prompts]
    metrics = score_generations(task_name, questions, answers, responses)
    samples = [
        {"prompt": q, "response": r, "answer": a, "correct": r.strip() == a.strip()}
        for q, r, a in list(zip(questions, responses, answers, strict=False))[:n_samples]
    ]
    return metrics, samples


@torch.no_grad()
def score_sequences(
    reward_model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 256
) -> torch.Tensor:
    """The reward model's score of each token sequence (prompt + response + EOS), read at its last
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
    rollout is: the rendered prompt, the response tokens, EOS. -> (N,)"""
    return score_sequences(reward_model, response_rows(tokenizer, prompts, responses), tokenizer.pad_token_id)


def response_rows(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]], responses: Sequence[str]
) -> list[list[int]]:
    """The token ids `score_responses` scores: rendered chat prompt + response tokens + EOS."""
    prompt_ids = render_prompts(tokenizer, prompts)
    answers = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [p + a + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answers, strict=True)]


def evaluate_directory(
    policy_dir: str,
    reward_model_dir: str | None,
    examples: list[dict],
    task_name: str | None,
    gen: GenerationConfig,
    init: ModelInit,
    precision: Precision,
    seed: int = 0,
) -> dict:
    """Held-out accuracy (per bucket) of a saved policy, greedy, loaded as a user would, and the
    reward model's mean score of its answers. Main process only, plain (unsharded) models.
    `seed`: the stage's, so that a built-in preset (a random init) is the model the stage trains."""
    source = resolve(policy_dir)
    tokenizer = load_tokenizer(source, init)
    with whole_models():
        policy = build_policy(source, init, tokenizer, seed=seed, precision=precision).eval()
    metrics, samples = evaluate_generations(policy, tokenizer, examples, task_name, gen)
    if reward_model_dir:
        rm_source = resolve(reward_model_dir)
        with whole_models():
            rm_tokenizer = load_tokenizer(rm_source, init)
            reward_model = build_scalar_model(rm_source, init, rm_tokenizer, precision=precision).eval()
        responses = generate_text(policy, tokenizer, [e["prompt"] for e in examples], gen)
        scores = score_responses(reward_model, tokenizer, [e["prompt"] for e in examples], responses)
        metrics["rm_score"] = round(scores.mean().item(), 4) if len(scores) else 0.0
    return {**metrics, "samples": samples}


def evaluate_in_loop(
    model, reward_model, accelerator, tokenizer, examples: list[dict], task_name: str | None, gen: GenerationConfig
) -> dict:
    """Held-out accuracy during training (`eval/ppo/…`). The prompts are split across processes
    (every process takes part, as ZeRO-3 requires); each answer travels with its item's index,
    so the padding that evens out the shards is dropped and no item is lost or counted twice."""
    indices = list(range(len(examples)))
    with accelerator.split_between_processes(indices, apply_padding=True) as shard:
        prompts = [examples[i]["prompt"] for i in shard]
        with torch.no_grad(), gathered_for_generation(model, accelerator) as unwrapped:
            responses = generate_text(unwrapped.policy, tokenizer, prompts, gen)
        scores = score_responses(reward_model, tokenizer, prompts, responses).tolist() if reward_model else None
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


def summary(metrics: dict | None) -> dict | None:
    """The headline of an evaluation: accuracy, per bucket, and the reward model's mean score."""
    if not metrics:
        return None
    return {k: v for k, v in metrics.items() if k in ("accuracy", "accuracy_by_digits", "rm_score")}
