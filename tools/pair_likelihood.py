"""How well does a model's own likelihood rank a reward-model stage's held-out pairs? A yardstick
for an RM: the same pairs the RM stage evaluates on (`pairs.eval_size` generated ones, plus its
share of the init model's own mistakes), each ranked by the summed log-probability of the
response under the init model, with no training at all. An RM that ranks below this has not yet
learnt to read out what its body already knows (docs/real-model.md).

    python -m tools.pair_likelihood --config configs/smollm2-135m/rm.yaml model=runs/smollm2/sft
    python -m tools.pair_likelihood --config configs/tiny/rm.yaml model=runs/tiny/sft

Ends with one JSON line: `accuracy`, `accuracy_mean_per_token` (the mean log-probability per
response token instead of the sum), `accuracy_by_kind`, `n_by_kind`, `n`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rlhf.config import RMStageConfig, load_config
from rlhf.generation import left_pad
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import build_policy, load_tokenizer, position_ids_from_mask, resolve
from stages.reward.pairs import preference_pairs
from stages.reward.train import encode_pairs


def response_logprobs(model, rows: list[list[int]], starts: list[int], pad_id: int) -> tuple[list[float], list[float]]:
    """(summed, mean per token) log-probability of each row's tokens from `starts[i]` on, given the
    tokens before them: one forward for all rows, left-padded with generate's positions, as PPO
    scores a rollout."""
    ids, mask = left_pad(rows, pad_id, next(model.parameters()).device)  # (B, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    token_lp = -F.cross_entropy(out.logits.float()[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    first = torch.tensor([ids.shape[1] - len(r) + s for r, s in zip(rows, starts, strict=True)], device=ids.device)
    positions = torch.arange(1, ids.shape[1], device=ids.device)[None, :]  # the position each entry scores
    counted = positions >= first[:, None]  # (B, T-1): the response tokens (padding sits before the row)
    sums = (token_lp * counted).sum(1)
    return sums.tolist(), (sums / counted.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def rank_pairs(model, rows: list[dict], pad_id: int, precision: Precision, batch_size: int = 16) -> list[tuple]:
    """Per pair (chosen sum > rejected sum, chosen mean > rejected mean), rows from `encode_pairs`."""
    model.eval()
    ranked = []
    for i in tqdm(range(0, len(rows), batch_size), desc="pairs", unit="batch"):
        batch = rows[i : i + batch_size]
        starts = [r["response_start"] for r in batch]
        with precision.autocast(next(model.parameters()).device.type):
            c_sum, c_mean = response_logprobs(model, [r["chosen_ids"] for r in batch], starts, pad_id)
            r_sum, r_mean = response_logprobs(model, [r["rejected_ids"] for r in batch], starts, pad_id)
        ranked += [(cs > rs, cm > rm) for cs, rs, cm, rm in zip(c_sum, r_sum, c_mean, r_mean, strict=True)]
    return ranked


def summary(pairs: list[dict], ranked: list[tuple]) -> dict:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p, (by_sum, _) in zip(pairs, ranked, strict=True):
        by_kind[p.get("kind", "all")].append(by_sum)
    n = len(ranked)
    return {
        "accuracy": round(sum(s for s, _ in ranked) / n, 4),
        "accuracy_mean_per_token": round(sum(m for _, m in ranked) / n, 4),
        "accuracy_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
        "n_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "n": n,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the RM stage's YAML (its model= is the init model)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for the RM stage")
    args = parser.parse_args(argv)
    cfg = load_config(RMStageConfig, args.config, args.overrides)
    precision = resolve_precision(cfg.model_init)
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model_init)
    pairs = preference_pairs(cfg, source, tokenizer, precision).eval
    if not pairs:
        raise SystemExit(f"{args.config}: no held-out pairs (pairs.eval_size or data.eval)")
    model = build_policy(source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision)
    result = summary(pairs, rank_pairs(model, encode_pairs(tokenizer, pairs, False), tokenizer.pad_token_id, precision))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
