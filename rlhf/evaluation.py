"""Held-out evaluation by generation: greedy answers to held-out prompts, scored by the task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.data import reference_answer
from rlhf.generation import generate_text
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
