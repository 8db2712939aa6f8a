"""Reward sources (`reward.sources`, issue 26): one registry, one signature. A kind added from outside
is configured, built and weighted like the built-in ones; the sum is worked out by hand; the keys
the sources replaced are refused with one line naming the new key."""

from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator

from conftest import ROOT
from rlhf.config import ConfigError, PPOStageConfig, load_config
from rlhf.config.rewards import REWARD_KINDS, RewardSourceConfig, reward_kind
from stages.ppo.rewards import SOURCES, Episodes, SourceContext, build_sources, reward_source
from stages.ppo.scores import combine_scores

TINY = ROOT / "configs/tiny/ppo.yaml"


@dataclass(frozen=True)
class LengthSourceConfig(RewardSourceConfig):
    per_char: float = 1.0  # the kind's own setting


def length_source(name, cfg, ctx):
    return lambda ep: torch.tensor([cfg.per_char * len(r) for r in ep.responses], device=ctx.accelerator.device)


@pytest.fixture
def length_kind():
    """A kind registered by outside code: its config dataclass and its scorer, by decorator."""
    reward_kind("length")(LengthSourceConfig)
    reward_source("length")(length_source)
    yield
    del REWARD_KINDS["length"], SOURCES["length"]


def _episodes(responses):
    prompts = [[{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}]] * len(responses)
    ids = torch.zeros(len(responses), 4, dtype=torch.long)
    return Episodes(prompts=prompts, responses=responses, fields={}, input_ids=ids, attention_mask=ids + 1)


def test_an_outside_kind_is_configured_built_and_weighted_like_a_built_in_one(length_kind):
    overrides = ["reward_model=null", "reward.sources.rm=null", "reward.sources.len={kind: length, weight: 0.5}"]
    overrides += ["reward.sources.len.per_char=2", "reward.sources.subtraction={kind: rule, weight: 3}"]
    cfg = load_config(PPOStageConfig, TINY, overrides)
    assert list(cfg.reward.active()) == ["len", "subtraction"]
    sources = build_sources(cfg.reward, SourceContext(accelerator=Accelerator(cpu=True)))
    components = {name: source(_episodes(["35", "8"])) for name, source in sources.items()}
    assert components["len"].tolist() == [4.0, 2.0]  # 2 per character
    assert components["subtraction"].tolist() == [1.0, 0.0]  # 52 - 17 = 35
    has_eos = torch.tensor([True, False])
    # 0.5 · 4 + 3 · 1 = 5; 0.5 · 2 + 3 · 0 − 1 (no EOS) = 0
    assert combine_scores(components, has_eos, cfg.reward).tolist() == [5.0, 0.0]
    with pytest.raises(ConfigError, match="unknown key"):  # the kind's own fields are checked at load
        load_config(PPOStageConfig, TINY, [*overrides, "reward.sources.len.per_word=1"])


def test_a_weight_zero_source_is_scored_not_added():
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo_rule.yaml", ["reward.missing_eos_penalty=null"])
    assert {n: (s.kind, s.weight) for n, s in cfg.reward.active().items()} == {
        "rm": ("model", 0.0),
        "subtraction": ("rule", 1.0),
    }
    components = {"rm": torch.tensor([7.0, float("nan")]), "subtraction": torch.tensor([1.0, 0.0])}
    assert combine_scores(components, torch.tensor([True, True]), cfg.reward).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("reward.model_weight=0", "reward.sources.rm={kind: model, weight: 1.0}"),
        ("reward.rules={subtraction: 1.0}", "reward.sources.subtraction={kind: rule, weight: 1.0}"),
        ('reward.functions={"m:f": 1.0}', "kind: function"),
        ("reward.remote.url=http://127.0.0.1:1/score", "kind: remote"),
    ],
)
def test_the_replaced_keys_are_refused_with_one_line_naming_the_new_one(old, new):
    with pytest.raises(ConfigError) as e:
        load_config(PPOStageConfig, TINY, [old])
    message = str(e.value)
    assert f"config key '{old.split('=')[0].rsplit('.url', 1)[0]}'" in message and new in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["reward.sources.x={kind: rul}"], "did you mean 'rule'"),
        (["reward.sources.x={weight: 1}"], "unknown reward source kind None"),
        (["reward.sources.sevens={kind: rule}"], "unknown rule reward 'sevens'"),
        (["reward_model=null"], "reward.sources.rm is the reward model"),
        (["reward.sources.rm=null"], "no reward source"),
        (["reward.sources.rm2={kind: model}"], "at most one source of kind model"),
        (["reward.sources.overlong={kind: rule, rule: subtraction}"], "overlong penalty's name"),
        (["reward.sources.s={kind: remote, url: ftp://x}"], "must be an http"),
    ],
)
def test_bad_sources_are_refused_at_load(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(PPOStageConfig, TINY, overrides)
