"""On-policy preference pairs: the SFT model's own wrong answers, labelled by the task's checker
(`Task.is_correct`, passed in), against the right answer. Closer to how labellers rank a model's
outputs than synthetic mistakes (InstructGPT collects comparisons of the model's own samples)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.config import GenerationConfig
from rlhf.generation import generate_text


@torch.no_grad()
def mine_onpolicy_pairs(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[dict],
    wanted: int,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    is_correct: Callable[[str, str], bool],
    batch_size: int = 256,
) -> list[dict]:
    """Up to `wanted` pairs {prompt, chosen, rejected, kind: "onpolicy"}: for each pair's prompt,
    `samples` sampled answers, the wrong ones by `is_correct(response, answer)` (distinct) paired
    with the pair's chosen answer."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)
    mined: list[dict] = []
    step = max(1, batch_size // samples)
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        prompts = [p["prompt"] for p in chunk for _ in range(samples)]
        answers = generate_text(model, tokenizer, prompts, gen, batch_size=batch_size)
        for i, pair in enumerate(chunk):
            right = pair["chosen"][0]["content"]
            wrong = {
                a.strip() for a in answers[i * samples : (i + 1) * samples] if a.strip() and not is_correct(a, right)
            }
            for answer in sorted(wrong):
                mined.append(
                    {
                        "prompt": pair["prompt"],
                        "chosen": pair["chosen"],
                        "rejected": [{"role": "assistant", "content": answer}],
                        "kind": "onpolicy",
                    }
                )
                if len(mined) >= wanted:
                    return mined
    return mined
