"""tools/pair_likelihood: the init model's own likelihood as a yardstick for the reward model."""

import json
from pathlib import Path

import torch

from rlhf.config.parts import ModelInit
from rlhf.registry import build_policy, load_tokenizer, resolve
from tools import pair_likelihood

ROOT = Path(__file__).resolve().parents[1]


def test_response_logprobs_match_one_unpadded_forward_per_row():
    source = resolve("tiny")
    tokenizer = load_tokenizer(source, ModelInit())
    model = build_policy(source, ModelInit(), tokenizer, seed=0).eval()
    rows = [[5, 9, 13, 7, 8, 21], [5, 9, 13, 30], [11, 12, 13, 14, 15]]
    starts = [3, 2, 4]  # the response: from this position on
    with torch.no_grad():
        sums, means = pair_likelihood.response_logprobs(model, rows, starts, tokenizer.pad_token_id)
        for row, start, got_sum, got_mean in zip(rows, starts, sums, means, strict=True):
            logp = model(input_ids=torch.tensor([row])).logits[0].float().log_softmax(-1)  # (T, V)
            want = [logp[t - 1, row[t]].item() for t in range(start, len(row))]
            assert abs(got_sum - sum(want)) < 1e-4 and abs(got_mean - sum(want) / len(want)) < 1e-5


def test_ranks_the_rm_stages_held_out_pairs(capsys):
    overrides = ["model=tiny", "pairs.train_size=8", "pairs.eval_size=12", "pairs.onpolicy_fraction=0"]
    result = pair_likelihood.main(["--config", str(ROOT / "configs/tiny/rm.yaml"), *overrides])
    assert result["n"] == 12 == sum(result["n_by_kind"].values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for kind, acc in result["accuracy_by_kind"].items():
        assert 0.0 <= acc <= 1.0 and result["n_by_kind"][kind] > 0


def test_a_reference_ranks_by_the_log_ratio():
    # pair 0: the model prefers the rejected answer, but less than the reference does: the ratio ranks it right
    model = torch.tensor([[-3.0, -2.0, -1.5, -1.0], [-1.0, -4.0, -0.5, -2.0]], dtype=torch.float64)
    reference = torch.tensor([[-6.0, -2.0, -3.0, -1.0], [-0.5, -5.0, -0.25, -2.5]], dtype=torch.float64)
    assert pair_likelihood.rank_pairs(model) == [(False, False), (True, True)]
    assert pair_likelihood.rank_pairs(model, reference) == [(True, True), (False, False)]
