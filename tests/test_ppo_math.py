"""PPO's pure functions against values worked out by hand (in the comments)."""

import math

import pytest
import torch

from stages.ppo.advantages import explained_variance, explained_variance_sums, gae
from stages.ppo.core_algos import (
    KLController,
    entropy_from_logits,
    kl_estimate,
    kl_penalized_rewards,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_sums,
    masked_var,
    masked_whiten,
    moments,
    policy_loss,
    value_loss,
)
from stages.ppo.optim import adamw

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_mean_and_var():
    # masked values 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3; / (n-1) = 7/3
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)
    assert masked_var(X, M).item() == pytest.approx(7 / 3)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)
    assert torch.allclose(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_mean(X, torch.zeros_like(M)).item() == 0.0  # empty mask: 0, not NaN


def test_masked_whiten():
    w = masked_whiten(X, M)
    assert masked_mean(w, M).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, M).item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 2] == 0 and w[1, 1] == 0 and w[1, 2] == 0


def test_last_index():
    assert last_index(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]


def test_logprobs_and_entropy():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]])
    lp = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)
    # H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
    assert entropy_from_logits(logits)[0, 0].item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # bf16 logits are upcast: the result is fp32
    assert logprobs_from_logits(logits.bfloat16(), torch.tensor([[2, 0]])).dtype == torch.float32


def test_kl_estimators_by_hand():
    # p = 0.5, q = 0.25: r = ln 2; k1 = ln 2; k2 = (ln 2)^2 / 2; k3 = 1/2 - 1 + ln 2
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(math.log(2) ** 2 / 2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_k1_and_k3_are_unbiased():
    # E_p[k] over a discrete distribution equals KL(p || q) exactly for k1 and k3.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()
    for kind in ("k1", "k3"):
        expected = (p * kl_estimate(p.log(), q.log(), kind)).sum().item()
        assert expected == pytest.approx(true_kl, abs=1e-6)


def test_kl_penalized_rewards_by_hand():
    # beta 0.5: row 0 -> [-0.05, -0.1, -0.15 + 1.0]; row 1 -> [-0.25, -0.25 + 2.0, 0]
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = kl_penalized_rewards(scores, kl, 0.5, mask)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0]]))


def test_gae_by_hand():
    # Row 0, gamma 1, lambda 0.9, r = [0, 0, 1], V = [.5, .6, .7]:
    #   d2 = 1 - .7 = .3          A2 = .3
    #   d1 = .7 - .6 = .1         A1 = .1 + .9 * .3 = .37
    #   d0 = .6 - .5 = .1         A0 = .1 + .9 * .37 = .433;  returns = A + V = [.933, .97, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.9)
    assert adv[0].tolist() == pytest.approx([0.433, 0.37, 0.3])
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0])
    # Row with padding (junk at the pad), gamma .5, lambda 1, r = [0, 2, 99], V = [1, 1, 99], mask [1, 1, 0]:
    #   A2 = 0 (pad);  d1 = 2 + .5 * 0 - 1 = 1, A1 = 1;  d0 = 0 + .5 * 1 - 1 = -.5, A0 = -.5 + .5 * 1 = 0
    adv, ret = gae(
        torch.tensor([[0.0, 2.0, 99.0]]), torch.tensor([[1.0, 1.0, 99.0]]), torch.tensor([[1, 1, 0]]), 0.5, 1.0
    )
    assert adv[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 2.0, 0.0])


def test_policy_loss_by_hand():
    # eps .2; token 1: rho 1.5, A +1 -> max(-1.5, -1.2) = -1.2 (clipped)
    #         token 2: rho 0.5, A +1 -> max(-0.5, -0.8) = -0.5
    #         token 3: rho 0.5, A -1 -> max(0.5, 0.8) = 0.8 (clipped);  mean = -0.3, clipfrac 2/3
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(-0.3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # the gradient flows only through the unclipped token: d/dlogp (-A * rho) / 3 = -(1)(.5)/3
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, adv, torch.ones(1, 3), 0.2)[0].backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, -0.5 / 3, 0.0])


def test_policy_loss_with_truncated_importance_weights_by_hand():
    # the tokens of test_policy_loss_by_hand, per-token terms -1.2, -0.5, 0.8; TIS weights
    # min(π_trainer / π_engine, C = 2) for engine log-probs log(.5), log(2), log(.1) below a trainer's 0:
    # 2, .5, min(10, 2) = 2  ->  (-2.4 - 0.25 + 1.6) / 3 = -0.35
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    engine = torch.log(torch.tensor([[0.5, 2.0, 0.1]]))
    weights = torch.exp(old - engine).clamp(max=2.0)
    loss, _ = policy_loss(new, old, adv, torch.ones(1, 3), 0.2, weights=weights)
    assert weights[0].tolist() == pytest.approx([2.0, 0.5, 2.0])
    assert loss.item() == pytest.approx(-0.35)


def test_value_loss_by_hand():
    # c = .2: t0: (1-2)^2 = 1 vs clipped V .7: (.7-2)^2 = 1.69 -> 1.69
    #         t1: (0-0)^2 = 0 vs clipped V .3: .09 -> .09;  loss = .5 * (1.69 + .09) / 2 = .445
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, stats = value_loss(values, old, ret, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.445)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    loss, _ = value_loss(values, old, ret, torch.ones(1, 2), None)  # unclipped: .5 * (1 + 0) / 2
    assert loss.item() == pytest.approx(0.25)


def test_kl_controllers():
    # e = clip(12/6 - 1, -.2, .2) = .2: beta = .1 * (1 + .2 * 64 / 10000) = .100128
    ctl = KLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 64)
    assert ctl.value == pytest.approx(0.100128)
    ctl = KLController(0.1, target=6.0, horizon=10_000)
    ctl.update(3.0, 64)  # e = -.5 -> -.2
    assert ctl.value == pytest.approx(0.099872)
    again = KLController(1.0, 6.0, 10_000)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    fixed = KLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + 2.5, ret, mask) == pytest.approx(0.0, abs=1e-6)


# Two categorical distributions with dyadic probabilities, so that a list of tokens in which each
# appears in proportion to its probability under `old` makes a plain token mean an exact expectation.
OLD = torch.tensor([0.5, 0.25, 0.125, 0.125])
NEW = torch.tensor([0.1, 0.2, 0.3, 0.4])
OLD_SAMPLES = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 3]])  # 8 tokens: 4/8, 2/8, 1/8, 1/8


def test_approx_kl_is_kl_old_to_new_exactly():
    # the rollout's tokens come from the old policy: E_old[k3] must be KL(old || new) = Σ old·log(old/new)
    kl_old_new = (OLD * (OLD / NEW).log()).sum().item()
    new_lp, old_lp = NEW.log()[OLD_SAMPLES], OLD.log()[OLD_SAMPLES]
    mask = torch.ones_like(new_lp)
    _, stats = policy_loss(new_lp, old_lp, torch.zeros_like(new_lp), mask, clip_range=0.2)
    assert stats["approx_kl"].item() == pytest.approx(kl_old_new, abs=1e-6)
    # and it is >= 0 per token, 0 where the policies agree
    _, same = policy_loss(old_lp, old_lp, torch.zeros_like(old_lp), mask, clip_range=0.2)
    assert same["approx_kl"].item() == 0.0


def test_kl_estimate_k3_is_kl_policy_to_ref_exactly():
    # the other direction: tokens sampled from the policy (OLD here), KL(policy || ref) with ref = NEW
    kl_policy_ref = (OLD * (OLD / NEW).log()).sum().item()
    policy_lp, ref_lp = OLD.log()[OLD_SAMPLES], NEW.log()[OLD_SAMPLES]
    for kind in ("k1", "k3"):
        assert kl_estimate(policy_lp, ref_lp, kind).mean().item() == pytest.approx(kl_policy_ref, abs=1e-6)
    # KL is not symmetric: the estimator with its arguments swapped is not this KL
    assert kl_estimate(ref_lp, policy_lp, "k3").mean().item() != pytest.approx(kl_policy_ref, abs=1e-3)


def test_masked_mean_ignores_inf_at_padding():
    # a pad's log-prob can be -inf; 0 * inf = nan, so a multiplied-out mean would be NaN
    x = torch.tensor([[1.0, 3.0, -math.inf], [2.0, math.inf, math.nan]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 2.0])
    assert torch.isfinite(masked_whiten(x, mask)).all()


def test_whitening_and_explained_variance_from_summed_moments():
    # two "processes" holding parts of one batch: whitening each with the summed sums equals
    # whitening the concatenation; the same for explained variance
    x, mask = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), (torch.rand(6, 5) > 0.3).long()
    v = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    parts = [(x[:2], mask[:2], v[:2]), (x[2:], mask[2:], v[2:])]
    sums = sum(masked_sums(a, m) for a, m, _ in parts)
    mean, var = moments(sums)
    assert mean.item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-6)
    assert var.item() == pytest.approx(masked_var(x, mask).item(), abs=1e-5)
    whole = masked_whiten(x, mask)
    together = torch.cat([masked_whiten(a, m, sums=sums) for a, m, _ in parts])
    assert torch.allclose(together, whole, atol=1e-6)
    ev_sums = sum(explained_variance_sums(b, a, m) for a, m, b in parts)
    assert explained_variance(v[:2], x[:2], mask[:2], ev_sums) == pytest.approx(explained_variance(v, x, mask))


def test_ppo_optimizer_steps_as_plain_adamw_per_group():
    """PPO's AdamW (fused on a CPU) gives each parameter group its own lr, betas and weight decay,
    as torch's reference single-tensor AdamW does, step for step."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [
            {"params": params[:2], "lr": 1e-2, "betas": (0.9, 0.98), "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-2, "betas": (0.8, 0.999), "weight_decay": 0.0},
        ]
        opt = make(groups)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return opt, params

    fused, ours = run(lambda groups: adamw(groups, lr=1e-3))
    assert fused.defaults["fused"] is True
    _, reference = run(lambda groups: torch.optim.AdamW(groups, lr=1e-3, foreach=False))
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(ours[0], start[0])


def test_an_inf_at_padding_stays_out_of_rewards_advantages_and_losses():
    """k3 of a pad's log-prob can overflow to inf; inf · 0 = NaN, so masking must select, not multiply."""
    from stages.ppo.advantages import grpo, reinforce_pp
    from stages.ppo.core_algos import aggregate_loss, masked

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, math.inf], [0.1, 0.1, 0.1]])
    assert torch.equal(masked(kl, mask), torch.tensor([[0.1, 0.2, 0.0], [0.1, 0.1, 0.1]]))
    rewards = kl_penalized_rewards(torch.tensor([1.0, 0.0]), kl, 0.5, mask)
    assert torch.isfinite(rewards).all() and rewards[0].tolist() == pytest.approx([-0.05, 0.9, 0.0])
    assert torch.isfinite(aggregate_loss(kl, mask, "seq_mean_token_sum_norm", max_len=3))
    values = torch.tensor([[0.5, 0.5, math.inf], [0.5, 0.5, 0.5]])
    assert all(torch.isfinite(t).all() for t in gae(rewards, values, mask, 1.0, 0.95))
    assert all(torch.isfinite(t).all() for t in reinforce_pp(kl, None, mask, gamma=1.0, lam=1.0, group_size=1))
    assert torch.isfinite(grpo(kl, None, mask, gamma=1.0, lam=1.0, group_size=2)[0]).all()
