"""The gold measure (issue 16): the task's checker is logged beside the learned reward on every
PPO step (`train/ppo/gold`) and at every evaluation (`eval/ppo/gold_accuracy`), and it enters the
score only when a rule source puts it there."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from conftest import ROOT
from rlhf.config import ModelInit, PPOStageConfig, load_config
from rlhf.registry import load_tokenizer, resolve
from stages.ppo.rewards import SourceContext, build_sources
from stages.ppo.run import PPORun
from stages.ppo.scores import gold_scores, score_episodes

# three prompts: 52 - 17 = 35 (answered right), 90 - 8 = 82 (answered 81), one without an answer
ROWS = [
    {"prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}], "answer": "35"},
    {"prompt": [{"role": "user", "content": "请计算：90 - 8 = ，直接返回计算结果"}], "answer": "82"},
    {"prompt": [{"role": "user", "content": "请计算：7 - 9 = ，直接返回计算结果"}], "answer": None},
]
RESPONSES = ["35", "81", "-2"]


def _score(*overrides):
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["reward_model=null", *overrides])
    tokenizer = load_tokenizer(resolve("tiny"), ModelInit())
    # each response ends at its stop token (EOS), as an engine returns it; right-padded after it
    rows = [[*ids, tokenizer.eos_token_id] for ids in tokenizer(RESPONSES, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    response = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    # no reward model: the score is the rules'; the tiny tokenizer's turns end at EOS
    accelerator = Accelerator(cpu=True)
    sources = build_sources(cfg.reward, SourceContext(accelerator=accelerator))
    models = SimpleNamespace(tokenizer=tokenizer, reward_sources=sources, stop_ids=(tokenizer.eos_token_id,))
    data = SimpleNamespace(prompts=ROWS)
    mask = torch.cat([torch.ones(3, 4, dtype=torch.long), (response != tokenizer.pad_token_id).long()], dim=1)
    has_eos = torch.ones(3, dtype=torch.bool)
    run = PPORun(cfg=cfg, accelerator=accelerator, models=models, engine=None, data=data, kl_ctl=None, running=None)
    return score_episodes(run, [0, 1, 2], None, mask, response, has_eos)


def test_gold_checks_each_answer_and_is_nan_without_one():
    gold = gold_scores("subtraction", ["35", "82", None], RESPONSES, "cpu")
    assert gold[:2].tolist() == [1.0, 0.0] and gold[2].isnan()
    # without a task: plain exact match, surrounding white space ignored
    assert gold_scores(None, ["a", "b"], [" a ", "c"], "cpu").tolist() == [1.0, 0.0]


def test_gold_is_logged_but_not_in_the_score_unless_a_rule_puts_it_there():
    # the score: partial credit per digit (a reward function); 81 for 82 has one of two digits right
    digits = '{kind: function, function: "rlhf.tasks.subtraction:digits_reward"}'
    scored = _score(f"reward.sources.digits={digits}", "reward.sources.rm=null")
    assert scored.gold_scores[:2].tolist() == [1.0, 0.0]
    assert scored.raw_scores.tolist() == [1.0, 0.5, 1.0]  # the digits alone: gold added nothing
    # configured: the subtraction rule (the same checker, reading the question) is the score;
    # 7 - 9 = -2 is right by the rule although the row carries no answer to check it against
    ruled = _score("reward.sources.subtraction={kind: rule, weight: 2.0}", "reward.sources.rm=null")
    assert ruled.components["subtraction"].tolist() == [1.0, 0.0, 1.0]  # logged before its weight
    assert ruled.raw_scores.tolist() == [2.0, 0.0, 2.0]
    assert ruled.gold_scores[:2].tolist() == [1.0, 0.0]


def test_the_overlong_penalty_is_shaping_logged_beside_the_sources():
    # max_new_tokens 8, buffer 6: free up to 2 tokens; each response is 2 characters + EOS = 3 tokens,
    # one over: −1/6 each (DAPO eq. 13), added after the sources' weighted sum
    scored = _score(
        "reward.sources.subtraction={kind: rule, weight: 2.0}", "reward.sources.rm=null", "reward.overlong_buffer=6"
    )
    assert list(scored.components) == ["subtraction", "overlong"]
    assert scored.components["overlong"].tolist() == pytest.approx([-1 / 6] * 3)
    assert scored.raw_scores.tolist() == pytest.approx([2 - 1 / 6, -1 / 6, 2 - 1 / 6])
