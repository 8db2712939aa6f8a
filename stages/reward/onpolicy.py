"""On-policy preference pairs: the SFT model's own wrong answers, labelled by the task's checker
(`Task.is_correct`, passed in), against the right answer. Closer to how labellers rank a model's
outputs than synthetic mistakes (InstructGPT collects comparisons of the model's own samples).

Only answers that ended by themselves (EOS or the template's end of turn) are judged: one cut off
at `max_new_tokens` may be a right answer not yet finished, and mined as "rejected" it would teach
the reward model to rank a right answer below the right answer. Those are dropped and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.config import GenerationConfig
from rlhf.generation import generate_answers

log = logging.getLogger("rlhf.pairs")


@dataclass(kw_only=True)
class MinedPairs:
    pairs: list[dict]  # {prompt, chosen, rejected, kind: "onpolicy"}
    sampled: int  # answers sampled
    cut_off: int  # of those, answers that never stopped within max_new_tokens (never mined)


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
    progress: bool = False,
) -> MinedPairs:
    """Up to `wanted` pairs {prompt, chosen, rejected, kind: "onpolicy"}: for each pair's prompt,
    `samples` sampled answers, the wrong ones by `is_correct(response, answer)` (distinct) paired
    with the pair's chosen answer. Answers without a stop token are dropped, not judged. With
    `progress`, a bar counts the pairs mined (minutes on a real model's CPU run)."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)
    mined: list[dict] = []
    sampled = cut_off = 0
    step = max(1, batch_size // samples)
    with tqdm(total=wanted, desc="on-policy pairs", unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            prompts = [p["prompt"] for p in chunk for _ in range(samples)]
            answers, ended, _ = generate_answers(model, tokenizer, prompts, gen, batch_size=batch_size)
            sampled += len(answers)
            cut_off += ended.count(False)
            found = len(mined)
            for i, pair in enumerate(chunk):
                right = pair["chosen"][0]["content"]
                group = range(i * samples, (i + 1) * samples)
                wrong = {answers[k].strip() for k in group if ended[k] and answers[k].strip()}
                for answer in sorted(a for a in wrong if not is_correct(a, right)):
                    mined.append(
                        {
                            "prompt": pair["prompt"],
                            "chosen": pair["chosen"],
                            "rejected": [{"role": "assistant", "content": answer}],
                            "kind": "onpolicy",
                        }
                    )
                    if len(mined) >= wanted:
                        bar.update(len(mined) - found)
                        return _report(MinedPairs(pairs=mined, sampled=sampled, cut_off=cut_off), max_new_tokens)
            bar.update(len(mined) - found)
    return _report(MinedPairs(pairs=mined, sampled=sampled, cut_off=cut_off), max_new_tokens)


def _report(result: MinedPairs, max_new_tokens: int) -> MinedPairs:
    log.info(
        "on-policy mining: %d pairs from %d samples; %d cut off at %d tokens without EOS, dropped",
        len(result.pairs),
        result.sampled,
        result.cut_off,
        max_new_tokens,
    )
    return result
