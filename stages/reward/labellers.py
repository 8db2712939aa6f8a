"""Who compares the policy's samples in an RLHF round (seed 002: the improved policy's new samples
are compared again to train a better reward model). A registry of plain functions keyed by name
(`labeller.name`): each takes a `Labelling` (the prompts, K sampled responses per prompt, the
reference answers, and what the labeller needs) and returns, per prompt, the ordered pairs
(better index, worse index) it found; ties give no pair.

- `rule`: the task's checker stands in for human raters: the K responses are ranked by it, and
  a ranked list of K gives every ordered pair, up to C(K, 2) (seed 003: a ranking says more
  than one thumbs up or down);
- `function`: your `package.module:function(prompt, a, b)` returning 0 (a is better), 1 (b is
  better) or None (no preference), asked once per pair of distinct responses;
- `judge`: RLAIF (seed 003; Bai et al. 2022, "Constitutional AI"; Lee et al. 2023): a local
  causal LM reads a written principle, the question and the two responses, and the next-token
  probability of "A" against "B" decides; asked in both orders, so that a judge that always
  prefers the first position gives no pair rather than a biased one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.generation import left_pad, render_prompts
from rlhf.reward_functions import RewardFunctionError, load_reward_function
from rlhf.tasks import gold_checker

log = logging.getLogger("rlhf.label")

JUDGE_TEMPLATE = (
    "{principle}\n\nQuestion: {question}\nResponse A: {a}\nResponse B: {b}\n"
    "Which response is better, A or B? Answer with one letter."
)


@dataclass(kw_only=True)
class Labelling:
    prompts: list[list[dict]]  # chat prompts
    responses: list[list[str]]  # K distinct responses per prompt
    answers: list[str | None]  # reference answers (the rule's and the gold agreement's), None where unknown
    task: str | None  # the task whose checker is the rule
    function: str = ""  # labeller.function: "package.module:function"
    principle: str = ""  # labeller.principle: what the judge is told makes a response better
    judge: torch.nn.Module | None = None  # the judge's causal LM (labeller.judge), eval mode
    judge_tokenizer: object = None


Pairs = list[list[tuple[int, int]]]  # per prompt: (better index, worse index)


def ranked_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Every ordered pair of a ranked list: (i, j) for each i scored above j; ties give none.
    K responses ranked in K distinct places give C(K, 2) pairs."""
    pairs = itertools.combinations(range(len(scores)), 2)
    return [(i, j) if scores[i] > scores[j] else (j, i) for i, j in pairs if scores[i] != scores[j]]


def rule_labeller(job: Labelling) -> Pairs:
    """The task's checker ranks each prompt's responses: right (1) above wrong (0)."""
    check = gold_checker(job.task)
    out = []
    for responses, answer in zip(job.responses, job.answers, strict=True):
        out.append([] if answer is None else ranked_pairs([float(check(r, answer)) for r in responses]))
    return out


def function_labeller(job: Labelling) -> Pairs:
    """`job.function(prompt, a, b)` -> 0 | 1 | None for each pair of a prompt's responses."""
    fn = load_reward_function(job.function)
    out = []
    for prompt, responses in zip(job.prompts, job.responses, strict=True):
        pairs = []
        for i, j in itertools.combinations(range(len(responses)), 2):
            try:
                choice = fn(prompt, responses[i], responses[j])
            except Exception as e:  # the user's code: named in the one-line error (its traceback at DEBUG)
                log.debug("labeller %s raised", job.function, exc_info=True)
                raise RewardFunctionError(f"labeller {job.function!r} raised {type(e).__name__}: {e}") from e
            if choice not in (0, 1, None) or isinstance(choice, bool):
                raise RewardFunctionError(f"labeller {job.function!r} returned {choice!r}; expected 0, 1 or None")
            if choice is not None:
                pairs.append((i, j) if choice == 0 else (j, i))
        out.append(pairs)
    return out


@torch.no_grad()
def judge_margins(job: Labelling, items: Sequence[tuple[list[dict], str, str]], batch_size: int = 64) -> list[float]:
    """For each (prompt, a, b): log P("A") − log P("B") of the judge's next token."""
    tok = job.judge_tokenizer
    letters = [tok(x, add_special_tokens=False)["input_ids"][-1] for x in ("A", "B")]
    device = next(job.judge.parameters()).device
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        chats = [
            [
                {
                    "role": "user",
                    "content": JUDGE_TEMPLATE.format(principle=job.principle, question=p[-1]["content"], a=a, b=b),
                }
            ]
            for p, a, b in items[start : start + batch_size]
        ]
        ids, mask = left_pad(render_prompts(tok, chats), tok.pad_token_id, device)
        # the LM head on the last position only: full-vocabulary logits of every position cost more
        # than the trunk at a real vocabulary (49k for SmolLM2) and are never read
        out_logits = job.judge(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        logits = out_logits[:, -1].float().log_softmax(-1)  # (b, V)
        out += (logits[:, letters[0]] - logits[:, letters[1]]).tolist()
    return out


def judge_labeller(job: Labelling) -> Pairs:
    """The judge compares each pair in both orders: a is better when it wins as A and as B, i.e.
    when m(a, b) − m(b, a) > 0 with m the A-over-B log-odds; 0 (pure position bias) gives no pair."""
    items, where = [], []
    for p, (prompt, responses) in enumerate(zip(job.prompts, job.responses, strict=True)):
        for i, j in itertools.combinations(range(len(responses)), 2):
            items += [(prompt, responses[i], responses[j]), (prompt, responses[j], responses[i])]
            where.append((p, i, j))
    margins = judge_margins(job, items) if items else []
    out: list[list[tuple[int, int]]] = [[] for _ in job.prompts]
    for k, (p, i, j) in enumerate(where):
        score = margins[2 * k] - margins[2 * k + 1]
        if score != 0:
            out[p].append((i, j) if score > 0 else (j, i))
    return out


LABELLERS: dict[str, Callable[[Labelling], Pairs]] = {
    "rule": rule_labeller,
    "function": function_labeller,
    "judge": judge_labeller,
}


def gold_agreement(job: Labelling, pairs: Pairs) -> tuple[float | None, int]:
    """(share, n): among the labelled pairs the task's checker can decide (one response right, the
    other wrong), the share the labeller ordered as the checker does; None when there are none."""
    check = gold_checker(job.task)
    agree = n = 0
    for responses, answer, found in zip(job.responses, job.answers, pairs, strict=True):
        if answer is None:
            continue
        for better, worse in found:
            right_b, right_w = check(responses[better], answer), check(responses[worse], answer)
            if right_b != right_w:
                n += 1
                agree += right_b
    return (agree / n if n else None), n
