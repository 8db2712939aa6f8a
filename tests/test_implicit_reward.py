"""tools/implicit_reward: a DPO model's implicit reward as a PPO function reward source."""

import pytest
import torch

from rlhf.config.parts import ModelInit
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from tools import implicit_reward


def _summed_logprob(model, ids: list[int], start: int) -> float:
    logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_the_reward_is_beta_times_the_summed_log_ratio_of_the_response():
    source = resolve("tiny")
    tokenizer = load_tokenizer(source, ModelInit())
    model = build_policy(source, ModelInit(), tokenizer, seed=0).eval()
    reference = build_policy(source, ModelInit(), tokenizer, seed=1).eval()  # another random init
    prompts = [[{"role": "user", "content": "12 - 5"}], [{"role": "user", "content": "40 - 31"}]]
    responses = ["7", "19"]
    got = implicit_reward.implicit_rewards(
        model, reference, tokenizer, resolve_precision(ModelInit()), prompts, responses, beta=0.5, batch_size=1
    )
    ids, starts = implicit_reward.response_rows(tokenizer, prompts, responses)
    with torch.no_grad():
        for row, start, value in zip(ids, starts, got, strict=True):
            want = 0.5 * (_summed_logprob(model, row, start) - _summed_logprob(reference, row, start))
            assert value == pytest.approx(want, abs=1e-4) and value != 0.0
    same = implicit_reward.implicit_rewards(
        model, model, tokenizer, resolve_precision(ModelInit()), prompts, responses, beta=0.5
    )
    assert same == [0.0, 0.0]  # a model against itself: no preference learnt, no reward


def test_the_function_source_names_the_settings_it_lacks(monkeypatch):
    monkeypatch.delenv("IMPLICIT_MODEL", raising=False)
    monkeypatch.setenv("IMPLICIT_REFERENCE", "runs/tiny/sft")
    with pytest.raises(ValueError, match="set IMPLICIT_MODEL "):
        implicit_reward.log_ratio([[{"role": "user", "content": "1 - 1"}]], ["0"], answer=["0"])
