"""How well does a model's own likelihood rank a reward-model stage's held-out pairs? A yardstick
for an RM: the same pairs the RM stage evaluates on (`pairs.eval_size` generated ones, plus its
share of the init model's own mistakes), each ranked by the summed log-probability of the
response under the init model, with no training at all. An RM that ranks below this has not yet
learnt to read out what its body already knows (docs/real-model.md).

    python -m tools.pair_likelihood --config configs/smollm2-135m/rm.yaml model=runs/smollm2/sft
    python -m tools.pair_likelihood --config configs/tiny/rm.yaml model=runs/tiny/sft
    python -m tools.pair_likelihood --config configs/tiny/rm.yaml model=runs/tiny/sft \
        --score-with runs/tiny/dpo --reference runs/tiny/sft      # a DPO model's implicit reward

`--score-with` ranks by another model's likelihood (the pairs are still the init model's), and
`--reference` subtracts a second model's: the log-ratio DPO's implicit reward is (up to its beta).

Ends with one JSON line: the RM stage's `accuracy`, `accuracy_generated`, `accuracy_by_kind`,
`n_by_kind`, `n`, and `accuracy_mean_per_token` (the mean log-probability per response token
instead of the sum).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from rlhf.config import RMStageConfig, load_config
from rlhf.generation import left_pad
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import ModelSource, build_policy, load_tokenizer, resolve
from stages.ppo.core_algos import logprobs_from_logits
from stages.ppo.models import policy_logits
from stages.reward.pairs import preference_pairs
from stages.reward.train import encode_pairs, pair_accuracies


def response_logprobs(model, rows: list[list[int]], starts: list[int], pad_id: int) -> tuple[list[float], list[float]]:
    """(summed, mean per token) log-probability of each row's tokens from `starts[i]` on, given the
    tokens before them: one forward for all rows, left-padded, as PPO scores a rollout (the LM head
    on the response positions only)."""
    ids, mask = left_pad(rows, pad_id, next(model.parameters()).device)  # (B, T)
    lengths = torch.tensor([len(r) - s for r, s in zip(rows, starts, strict=True)], device=ids.device)  # (B,)
    R = int(lengths.max())  # left padding right-aligns the rows: each response is among the last R tokens
    token_lp = logprobs_from_logits(policy_logits(model, ids, mask, R), ids[:, -R:])  # (B, R)
    counted = torch.arange(R, device=ids.device)[None, :] >= (R - lengths)[:, None]  # (B, R)
    sums = (token_lp * counted).sum(1)
    return sums.tolist(), (sums / lengths.clamp(min=1)).tolist()


@torch.no_grad()
def pair_logprobs(model, rows: list[dict], pad_id: int, precision: Precision, batch_size: int = 16) -> torch.Tensor:
    """(N, 4): chosen sum, rejected sum, chosen mean, rejected mean per pair, rows from `encode_pairs`."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="pairs", unit="batch"):
        batch = rows[i : i + batch_size]
        starts = [r["response_start"] for r in batch]
        with precision.autocast(next(model.parameters()).device.type):
            c_sum, c_mean = response_logprobs(model, [r["chosen_ids"] for r in batch], starts, pad_id)
            r_sum, r_mean = response_logprobs(model, [r["rejected_ids"] for r in batch], starts, pad_id)
        out += zip(c_sum, r_sum, c_mean, r_mean, strict=True)
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


def rank_pairs(logprobs: torch.Tensor, reference: torch.Tensor | None = None) -> list[tuple]:
    """Per pair (chosen sum > rejected sum, chosen mean > rejected mean) from `pair_logprobs`, of
    the log-ratio to `reference`'s where one is given."""
    lp = logprobs if reference is None else logprobs - reference
    return list(zip((lp[:, 0] > lp[:, 1]).tolist(), (lp[:, 2] > lp[:, 3]).tolist(), strict=True))


def summary(pairs: list[dict], ranked: list[tuple]) -> dict:
    """The RM stage's pair accuracies of the ranking by summed log-probability, and the overall one by the mean."""
    return {
        **pair_accuracies(pairs, [by_sum for by_sum, _ in ranked]),
        "accuracy_mean_per_token": round(sum(m for _, m in ranked) / len(ranked), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the RM stage's YAML (its model= is the init model)")
    parser.add_argument("--score-with", help="rank by this model's likelihood instead of the init model's")
    parser.add_argument("--reference", help="subtract this model's log-probabilities (a log-ratio, as DPO's reward)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for the RM stage")
    args = parser.parse_args(argv)
    cfg = load_config(RMStageConfig, args.config, args.overrides)
    precision = resolve_precision(cfg.model_init)
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model_init)
    # the whole of the stage's pair set, training mining included: the held-out on-policy pairs are
    # sampled after the training ones, so only this order gives the RM's own held-out set
    pairs = preference_pairs(cfg, source, tokenizer, precision).eval
    if not pairs:
        raise SystemExit(f"{args.config}: no held-out pairs (pairs.eval_size or data.eval)")
    rows = encode_pairs(tokenizer, pairs, False)

    def logprobs(where: ModelSource) -> torch.Tensor:
        model = build_policy(where, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision)
        return pair_logprobs(model, rows, tokenizer.pad_token_id, precision)

    scored = logprobs(resolve(args.score_with) if args.score_with else source)
    result = summary(pairs, rank_pairs(scored, logprobs(resolve(args.reference)) if args.reference else None))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
