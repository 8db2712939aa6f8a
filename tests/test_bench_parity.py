"""tools/bench_ppo.py's `ours_grpo` does the work tools/bench_peers/trl_grpo.py configures TRL
1.16's GRPOTrainer for: the two configs are built by the scripts' own functions and compared
setting by setting (no training; a second or two)."""

from __future__ import annotations

import json

from tools import bench_ppo as bench
from tools.bench_peers import trl_grpo as peer


def test_ours_grpo_matches_trl_grpo_settings(tmp_path):
    setup = json.loads(json.dumps(bench.SETUP))  # what build_setup writes to setup.json
    ours = bench.ours_config("ours_grpo", tmp_path, updates=3)
    trl = peer.grpo_config(setup, str(tmp_path / "trl"), updates=3, bf16=False)

    # 16 prompts x 4 completions = 64 episodes per update, in 4 minibatches of 16, twice
    assert ours.rollout.prompts_per_step == 16 and ours.rollout.samples_per_prompt == 4
    assert ours.rollout.samples_per_prompt == trl.num_generations
    assert ours.rollout.episodes_per_step == trl.generation_batch_size == 64
    assert ours.ppo.minibatches == trl.steps_per_generation == 4
    assert ours.rollout.episodes_per_step // ours.ppo.minibatches == trl.per_device_train_batch_size == 16
    assert ours.train.grad_accum == trl.gradient_accumulation_steps == 1  # one optimizer step per minibatch
    assert ours.ppo.epochs == trl.num_iterations == 2
    # 4 updates (one warm-up) of 4 minibatches x 2 iterations = TRL's 32 optimizer steps
    assert ours.train.max_steps * ours.ppo.minibatches * ours.ppo.epochs == trl.max_steps == 32
    # the objective: group-normalised advantages, clipped ratio at 0.2, beta * k3 in the loss, token mean
    assert ours.ppo.advantage_estimator == "grpo" and trl.scale_rewards == "group"
    assert ours.ppo.whiten_advantages is None  # grpo: not whitened, as TRL
    assert ours.ppo.kl_in == "loss" and ours.ppo.kl_estimator == "k3"
    assert ours.ppo.kl_coef == trl.beta == 0.05 and ours.ppo.kl_target is None
    # GRPOTrainer: epsilon_high = epsilon when unset
    assert trl.epsilon_high is None and ours.ppo.clip_range_high is None and ours.ppo.clip_range_low is None
    assert ours.ppo.clip_range == trl.epsilon == 0.2
    assert ours.ppo.loss_agg == "token_mean" and trl.loss_type == "dapo"
    assert ours.ppo.entropy_coef == 0.0
    # sampling: 16 new tokens from softmax(logits / 1), untruncated
    gen = ours.rollout.generation
    assert gen.max_new_tokens == trl.max_completion_length == 16
    assert gen.temperature == trl.temperature == 1.0
    assert (gen.top_k, gen.top_p) == (trl.top_k, trl.top_p) == (0, 1.0)
    # optimizer: AdamW, constant lr 1e-5, no weight decay, no clipping
    assert ours.optim.lr == trl.learning_rate == 1e-5
    assert ours.optim.scheduler == trl.lr_scheduler_type == "constant"
    assert tuple(ours.optim.betas) == (trl.adam_beta1, trl.adam_beta2) == (0.9, 0.999)
    assert ours.optim.weight_decay == trl.weight_decay == 0.0
    assert ours.optim.max_grad_norm is None and trl.max_grad_norm == 0.0
    # reward: the sequence-classification model alone, raw scores
    assert ours.reward.model_weight == 1.0 and not ours.reward.rules and ours.reward.normalize == "none"
    assert ours.reward.missing_eos_penalty is None and not trl.mask_truncated_completions


def test_ours_grpo_gae_differs_only_by_the_critic(tmp_path):
    grpo = bench.ours_config("ours_grpo", tmp_path, updates=3)
    gae = bench.ours_config("ours_grpo_gae", tmp_path, updates=3)
    assert gae.ppo.advantage_estimator == "gae" and not gae.share_policy_trunk and gae.value_model is None
    assert gae.rollout == grpo.rollout and gae.optim == grpo.optim and gae.model_init == grpo.model_init
    assert (gae.ppo.kl_in, gae.ppo.kl_estimator, gae.ppo.kl_coef) == (grpo.ppo.kl_in, grpo.ppo.kl_estimator, 0.05)
    assert (gae.ppo.epochs, gae.ppo.minibatches) == (grpo.ppo.epochs, grpo.ppo.minibatches)
