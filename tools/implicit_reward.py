"""A DPO model's implicit reward as PPO's reward: beta * (log pi_dpo(y|x) - log pi_ref(y|x)), summed
over the response's tokens (Rafailov et al. 2023, eq. 5), for a `function` reward source. A reward
model learnt from the same kind of preference pairs as the RM stage's, with no checker; on the
SmolLM2 task it ranks the RM's held-out pairs 0.918 where the scalar RM ranks 0.836
(docs/real-model.md). PPO's KL weight should equal beta (`ppo.kl_coef=<beta> ppo.kl_target=null`,
`reward.normalize=none`): the KL-regularised optimum is then the DPO model itself; at a smaller KL
weight it is that model's change raised to a power, and PPO runs away (docs/tiny-default.md).

    IMPLICIT_MODEL=runs/tiny/dpo IMPLICIT_REFERENCE=runs/tiny/sft \\
    python launch/stage3_ppo.py --config configs/tiny/ppo.yaml reward.sources.rm.weight=0 \\
        'reward.sources.implicit={kind: function, function: "tools.implicit_reward:log_ratio"}' \\
        ppo.kl_coef=0.1 ppo.kl_target=null

Set by environment (a function source takes no settings of its own): IMPLICIT_MODEL (the DPO
output), IMPLICIT_REFERENCE (its reference: the model DPO started from), IMPLICIT_BETA (DPO's beta,
0.1), IMPLICIT_PRECISION (`auto` for bf16 autocast where the CPU has it, as the SmolLM2 configs;
unset: fp32). It re-encodes each prompt and response as the RM stage encodes a pair and runs two
forwards of its own per step: a built-in reward kind that reuses PPO's reference log-probs is the
next step (docs/rewards.md).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from rlhf.config import ModelInit
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from stages.reward.train import encode_pairs
from tools.pair_likelihood import response_logprobs


@cache
def _models(model: str, reference: str, precision_setting: str | None) -> tuple:
    init = ModelInit(mixed_precision=precision_setting)
    precision = resolve_precision(init)
    tokenizer = load_tokenizer(resolve(reference), init)
    scored = build_policy(resolve(model), init, tokenizer, precision=precision).eval()
    ref = build_policy(resolve(reference), init, tokenizer, precision=precision).eval()
    if scored.get_input_embeddings().num_embeddings != ref.get_input_embeddings().num_embeddings:
        raise ValueError(f"IMPLICIT_MODEL {model} and IMPLICIT_REFERENCE {reference} have different vocabularies")
    return scored, ref, tokenizer, precision


def response_rows(tokenizer, prompts, responses) -> tuple[list[list[int]], list[int]]:
    """Each prompt + response as the RM stage encodes a pair's answer (the chat-rendered prompt, the
    response, the end of turn), and where its response starts."""
    answers = [
        {"prompt": p, "chosen": [{"role": "assistant", "content": r}]} for p, r in zip(prompts, responses, strict=True)
    ]
    rows = encode_pairs(tokenizer, [{**a, "rejected": a["chosen"]} for a in answers], False)
    return [r["chosen_ids"] for r in rows], [r["response_start"] for r in rows]


def implicit_rewards(
    model, reference, tokenizer, precision: Precision, prompts, responses, beta: float, batch_size: int = 64
) -> list[float]:
    """beta * (summed log-prob under `model` - under `reference`) of each response to its chat prompt."""
    ids, starts = response_rows(tokenizer, prompts, responses)
    rewards = []
    with torch.no_grad(), precision.autocast(next(model.parameters()).device.type):
        for i in range(0, len(ids), batch_size):
            batch, at = ids[i : i + batch_size], starts[i : i + batch_size]
            scored, _ = response_logprobs(model, batch, at, tokenizer.pad_token_id)
            ref, _ = response_logprobs(reference, batch, at, tokenizer.pad_token_id)
            rewards += [beta * (s - r) for s, r in zip(scored, ref, strict=True)]
    return rewards


def log_ratio(prompts, responses, **fields) -> list[float]:
    """The reward function: `function: "tools.implicit_reward:log_ratio"` (settings: the module's docstring)."""
    missing = [k for k in ("IMPLICIT_MODEL", "IMPLICIT_REFERENCE") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"tools.implicit_reward: set {' and '.join(missing)} (the DPO output and its reference)")
    model, ref, tokenizer, precision = _models(
        os.environ["IMPLICIT_MODEL"], os.environ["IMPLICIT_REFERENCE"], os.environ.get("IMPLICIT_PRECISION") or None
    )
    return implicit_rewards(
        model, ref, tokenizer, precision, prompts, responses, float(os.environ.get("IMPLICIT_BETA", "0.1"))
    )
