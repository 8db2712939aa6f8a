"""Stage 3's algorithm options against values worked out by hand (in the comments): the advantage
estimators, loss aggregation, asymmetric clipping, KL in the loss, DAPO's overlong penalty, and
the config combinations that are refused."""

import math

import pytest
import torch

from conftest import ROOT
from rlhf.config import ConfigError, PPOStageConfig, load_config
from rlhf.config.stages import PPORewardConfig
from stages.ppo import train as ppo_train
from stages.ppo.advantages import ESTIMATORS, dr_grpo, grpo, reinforce_pp, reinforce_pp_baseline, rloo
from stages.ppo.core_algos import aggregate_loss, kl_estimate, masked_whiten, policy_loss
from stages.ppo.scores import overlong_penalty

# Two prompts, three responses each (adjacent), two response tokens. Per-token rewards hold a KL
# term and the score at the last real token; row 1 ends after one token (99 is junk at its pad).
#   group 0: sequence rewards R = -.1 + 1.1 = 1,  0,  0 + 0 = 0
#   group 1: R = 2, 2, 2 (all equal)
REWARDS = torch.tensor([[-0.1, 1.1], [0.0, 99.0], [0.0, 0.0], [2.0, 99.0], [0.0, 2.0], [0.0, 2.0]])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 1]])
KW = {"gamma": 1.0, "lam": 1.0, "group_size": 3}


def per_sequence(advantages):
    """The advantage of each response (the group estimators give every real token the same one)."""
    return advantages[:, 0]


def test_grpo_by_hand():
    # group 0: mean 1/3; deviations 2/3, -1/3, -1/3; Bessel variance (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3)
    #   A = (2/3) / (0.57735 + 1e-4) = 1.15450,  (-1/3) / 0.57745 = -0.57725   (TRL: std unbiased, eps 1e-4)
    # group 1: all equal: 0 / (0 + 1e-4) = 0
    adv, _ = grpo(REWARDS, None, MASK, **KW)
    std = 1 / math.sqrt(3) + 1e-4
    assert per_sequence(adv).tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0, 0, 0])
    assert per_sequence(adv)[0].item() == pytest.approx(1.15450, abs=1e-5)
    assert torch.equal(adv == 0, (MASK == 0) | (torch.arange(6) >= 3)[:, None])  # 0 on padding and on group 1


def test_dr_grpo_by_hand():
    # R - mean_g R: group 0 -> 2/3, -1/3, -1/3; group 1 -> 0 (no division by the std)
    adv, _ = dr_grpo(REWARDS, None, MASK, **KW)
    assert per_sequence(adv).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    assert adv[1, 1] == 0 and adv[0, 1] == adv[0, 0]


def test_rloo_by_hand():
    # leave-one-out baselines in group 0: (0 + 0) / 2 = 0, (1 + 0) / 2 = .5, (1 + 0) / 2 = .5
    #   A = 1 - 0 = 1, 0 - .5 = -.5, 0 - .5 = -.5   (= 3/2 · Dr. GRPO's);  group 1: 2 - 2 = 0
    adv, _ = rloo(REWARDS, None, MASK, **KW)
    assert per_sequence(adv).tolist() == pytest.approx([1.0, -0.5, -0.5, 0, 0, 0])


@pytest.mark.parametrize("name", ["grpo", "rloo", "dr_grpo"])
def test_group_advantages_sum_to_zero_and_equal_rewards_give_zero(name):
    torch.manual_seed(0)
    rewards = torch.randn(4 * 5, 7)
    mask = (torch.arange(7)[None, :] < torch.randint(1, 8, (20, 1))).long()
    adv, _ = ESTIMATORS[name].fn(rewards, None, mask, gamma=1.0, lam=1.0, group_size=5)
    assert per_sequence(adv).view(4, 5).sum(1).abs().max().item() < 1e-5
    assert torch.all(adv[mask == 0] == 0)
    same = torch.zeros(10, 3)
    same[:, -1] = 0.7  # every response to each prompt scored 0.7
    adv, _ = ESTIMATORS[name].fn(same, None, torch.ones(10, 3), gamma=1.0, lam=1.0, group_size=5)
    assert torch.all(adv == 0)


def test_reinforce_pp_by_hand():
    # returns from each token on: row 0, gamma 1: [-.1 + 1.1, 1.1] = [1, 1.1];
    #                                    gamma .5: [-.1 + .5 · 1.1, 1.1] = [.45, 1.1]
    # row 1's pad (99) is not a reward: [0, 0]
    adv, ret = reinforce_pp(REWARDS, None, MASK, gamma=1.0, lam=1.0, group_size=3)
    assert adv[0].tolist() == pytest.approx([1.0, 1.1]) and adv[1].tolist() == [0.0, 0.0]
    assert torch.equal(adv, ret)
    adv, _ = reinforce_pp(REWARDS, None, MASK, gamma=0.5, lam=1.0, group_size=3)
    assert adv[0].tolist() == pytest.approx([0.45, 1.1])
    # then the global normalisation (registered: the recipe whitens it over every token of the batch)
    # of the real tokens of rows 0 and 1: [1, 1.1, 0]: mean .7, Bessel var (.09 + .16 + .49) / 2 = .37
    two = reinforce_pp(REWARDS[:2], None, MASK[:2], gamma=1.0, lam=1.0, group_size=1)[0]
    assert ESTIMATORS["reinforce_pp"].whiten
    whitened = masked_whiten(two, MASK[:2])
    assert whitened[0].tolist() == pytest.approx([0.3 / math.sqrt(0.37), 0.4 / math.sqrt(0.37)], abs=1e-4)
    assert whitened[1].tolist() == pytest.approx([-0.7 / math.sqrt(0.37), 0.0], abs=1e-4)


def test_reinforce_pp_baseline_by_hand():
    # group 0's mean sequence reward 1/3 is subtracted at each response's last real token, then returns:
    #   row 0: [-.1, 1.1 - 1/3] -> [2/3, .76667];  row 1: [0 - 1/3] -> [-1/3, 0];  row 2: [0, -1/3] -> [-1/3, -1/3]
    # group 1 (mean 2): row 3: [2 - 2] -> [0, 0];  rows 4, 5: [0, 2 - 2] -> [0, 0]
    adv, _ = reinforce_pp_baseline(REWARDS, None, MASK, **KW)
    expected = [[2 / 3, 1.1 - 1 / 3], [-1 / 3, 0], [-1 / 3, -1 / 3], [0, 0], [0, 0], [0, 0]]
    assert adv.tolist() == [pytest.approx(row) for row in expected]
    assert ESTIMATORS["reinforce_pp_baseline"].whiten and ESTIMATORS["reinforce_pp_baseline"].needs_groups


def test_estimator_registry():
    assert set(ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert [n for n, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {n for n, e in ESTIMATORS.items() if not e.whiten} == {"grpo", "dr_grpo", "rloo"}
    with pytest.raises(ValueError, match="groups of 4"):
        grpo(REWARDS, None, MASK, gamma=1.0, lam=1.0, group_size=4)


def test_group_std_estimators_are_the_scale_free_ones():
    """The config refuses ppo.kl_in=reward for GROUP_STD_ESTIMATORS: exactly the group estimators whose
    advantages do not change when every reward is scaled (so β·KL in the reward would set the scale).
    Scores [1, 1, 1, 1] with KL sums [0.5, 1, 1.5, 2], β = 0.05: GRPO gives
    ±0.75β / (0.6455β + 1e-4) = ±1.158 and ±0.386 from the KL alone (std of [0.5, 1, 1.5, 2]: 0.6455)."""
    from rlhf.config.stages import GROUP_STD_ESTIMATORS

    rewards, mask = torch.tensor([[0.3, -1.2], [2.0, 0.5], [0.7, 0.0], [1.0, 1.5]]), torch.ones(4, 2)
    kw = {"gamma": 1.0, "lam": 1.0, "group_size": 4}
    scale_free = set()
    for name, e in ((n, e) for n, e in ESTIMATORS.items() if e.needs_groups):
        scaled = e.fn(3 * rewards, None, mask, **kw)[0]
        if torch.allclose(e.fn(rewards, None, mask, **kw)[0], scaled, rtol=1e-3):
            scale_free.add(name)
    assert scale_free == set(GROUP_STD_ESTIMATORS) == {"grpo"}
    kl_only = (1.0 - 0.05 * torch.tensor([0.5, 1.0, 1.5, 2.0]))[:, None] * torch.tensor([[0.0, 1.0]])
    adv, _ = grpo(kl_only, None, mask, **kw)
    assert adv[:, 0].tolist() == pytest.approx([1.1583, 0.3861, -0.3861, -1.1583], abs=1e-4)


def test_loss_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token_mean: (1 + 2 + 4) / 3;  seq_mean_token_mean: (1.5 + 4) / 2;  seq_mean_token_sum_norm: (3 + 4) / (2 · 4)
    assert aggregate_loss(x, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(x, mask, "seq_mean_token_mean").item() == pytest.approx(2.75)
    assert aggregate_loss(x, mask, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(7 / 8)
    # a sequence with no loss tokens (a masked-out truncated one): not in the sequence mean; still one of B
    empty = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert aggregate_loss(x, empty, "seq_mean_token_mean").item() == pytest.approx(1.5)
    assert aggregate_loss(x, empty, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(3 / 8)
    with pytest.raises(ValueError):
        aggregate_loss(x, mask, "seq_mean_token_sum_norm")


def test_policy_loss_aggregation_and_asymmetric_clip_by_hand():
    # rho [1.5, 0.5], A [+1, -1]; eps_low .2, eps_high .28:
    #   token 0: max(-1.5, -1.28) = -1.28 (clipped at 1 + .28);  token 1: max(.5, .8) = .8 (clipped at 1 - .2)
    #   token mean -0.24; with the symmetric .2: (-1.2 + .8) / 2 = -0.2
    new, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    assert policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.28)[0].item() == pytest.approx(-0.24)
    assert policy_loss(new, old, adv, mask, 0.2)[0].item() == pytest.approx(-0.2)
    # the same per-token losses summed over a constant 4 (Dr. GRPO): (-1.28 + .8) / 4
    loss, _ = policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.28, agg="seq_mean_token_sum_norm", max_len=4)
    assert loss.item() == pytest.approx(-0.12)


def test_kl_in_the_loss_gradients():
    """Exact expectations over a 3-token vocabulary, the tokens drawn from the current policy π:
    E_π[∇k1] = 0 (k1 in the loss does not regularise: refused); E_π[∇k2] = ∇KL(π‖ref);
    E_π[∇k3] = ∇KL(ref‖π), which also vanishes only at π = ref (GRPO's choice)."""
    theta = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5]), 0)

    def expected_grad(kind):
        logp = torch.log_softmax(theta, 0)
        (grad,) = torch.autograd.grad((logp.exp().detach() * kl_estimate(logp, ref, kind)).sum(), theta)
        return grad

    def true_grad(forward):
        logp = torch.log_softmax(theta, 0)
        kl = (ref.exp() * (ref - logp)).sum() if forward else (logp.exp() * (logp - ref)).sum()
        return torch.autograd.grad(kl, theta)[0]

    assert expected_grad("k1").abs().max().item() < 1e-7
    torch.testing.assert_close(expected_grad("k2"), true_grad(forward=False))
    torch.testing.assert_close(expected_grad("k3"), true_grad(forward=True))
    # by hand, one token: r = ln 2 (p = .5, ref = .25): d k3 / d log p = 1 - e^{-r} = .5
    lp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    kl_estimate(lp, torch.tensor([[math.log(0.25)]]), "k3").sum().backward()
    assert lp.grad.item() == pytest.approx(0.5)


def test_overlong_penalty_by_hand():
    # DAPO eq. 13, max 8 new tokens, buffer 4: free up to 4 tokens, then -(len - 4) / 4, -1 at 8; times p
    cfg = PPORewardConfig(overlong_buffer=4, overlong_penalty=0.5)
    lengths = torch.tensor([3, 4, 5, 6, 8])
    assert overlong_penalty(lengths, 8, cfg).tolist() == pytest.approx([0, 0, -0.125, -0.25, -0.5])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["ppo.kl_in=loss", "ppo.kl_estimator=k1"], "ppo.kl_estimator"),
        (["ppo.kl_in=reward", "ppo.kl_estimator=k3"], "ppo.kl_estimator"),
        (["rollout.prompts_per_step=6", "rollout.samples_per_prompt=3", "ppo.minibatches=4"], "ppo.minibatches"),
        (["rollout.dynamic_sampling=true"], "rollout.dynamic_sampling"),
        (["reward.overlong_buffer=8"], "reward.overlong_buffer"),
        (["ppo.clip_range_low=1.5"], "ppo.clip_range_low"),
        (["ppo.loss_agg=sum"], "ppo.loss_agg"),
    ],
)
def test_refused_combinations(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)


def test_samples_per_prompt_makes_the_episode_count():
    ok = ["rollout.prompts_per_step=6", "rollout.samples_per_prompt=2", "ppo.minibatches=4", "ppo.kl_in=loss"]
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [*ok, "ppo.kl_estimator=k3"])
    assert cfg.rollout.episodes_per_step == 12


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_need_groups_before_anything_loads(tmp_path, name):
    out = tmp_path / "x"
    cfg = load_config(
        PPOStageConfig,
        ROOT / "configs/tiny/ppo.yaml",
        [f"ppo.advantage_estimator={name}", f"output_dir={out}", "ppo.kl_coef=0"],
    )
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt"):
        ppo_train.train(cfg)
    assert not out.exists()
