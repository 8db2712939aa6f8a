"""tools/bench_ppo.py's `ours_grpo` does the work tools/bench_peers/trl_grpo.py configures TRL
1.16's GRPOTrainer for: the two configs are built by the scripts' own functions and compared
setting by setting (no training; a second or two)."""

from __future__ import annotations

import json

from transformers import LlamaConfig

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
    assert {n: (s.kind, s.weight) for n, s in ours.reward.active().items()} == {"rm": ("model", 1.0)}
    assert ours.reward.normalize == "none"
    assert ours.reward.missing_eos_penalty is None and not trl.mask_truncated_completions


def test_ours_grpo_gae_differs_only_by_the_critic(tmp_path):
    grpo = bench.ours_config("ours_grpo", tmp_path, updates=3)
    gae = bench.ours_config("ours_grpo_gae", tmp_path, updates=3)
    assert gae.ppo.advantage_estimator == "gae" and not gae.share_policy_trunk and gae.value_model is None
    assert gae.rollout == grpo.rollout and gae.optim == grpo.optim and gae.model_init == grpo.model_init
    assert (gae.ppo.kl_in, gae.ppo.kl_estimator, gae.ppo.kl_coef) == (grpo.ppo.kl_in, grpo.ppo.kl_estimator, 0.05)
    assert (gae.ppo.epochs, gae.ppo.minibatches) == (grpo.ppo.epochs, grpo.ppo.minibatches)


def test_a_saved_setup_sizes_both_trainers_work_alike(tmp_path):
    # --episodes 16 --new-tokens 4 (a --model smoke run): ours reads the work from setup.json, as TRL does
    setup = {**bench.SETUP, "prompts_per_update": 16, "new_tokens": 4}
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    ours = bench.ours_config("ours_grpo", tmp_path, updates=1)
    trl = peer.grpo_config(setup, str(tmp_path / "trl"), updates=1, bf16=False)
    assert ours.rollout.prompts_per_step == 4 and ours.rollout.samples_per_prompt == trl.num_generations == 4
    assert ours.rollout.episodes_per_step == trl.generation_batch_size == 16
    assert ours.rollout.episodes_per_step // ours.ppo.minibatches == trl.per_device_train_batch_size == 4
    assert ours.rollout.generation.max_new_tokens == trl.max_completion_length == 4
    assert bench.ours_config("ours", tmp_path, updates=1).rollout.prompts_per_step == 16


def test_update_flops_by_hand():
    # 2 episodes of 3 prompt + 1 response tokens = 8 tokens a pass; policy 10 params, scorer 5, 2 epochs
    setup = {"prompts_per_update": 2, "epochs": 2, "prompt_tokens_mean": 3, "policy_params": 10, "reward_params": 5}
    # GRPO: policy trained 6*10*8*2 = 960; sampling + reference 2*10*8*2 = 320; reward 2*5*8 = 80
    assert bench.update_flops("ours_grpo", setup, 1) == {"total": 1360, "train": 960}
    # PPO with a value model: + its training 6*5*8*2 = 480 and its forward 2*5*8 = 80
    assert bench.update_flops("ours", setup, 1) == {"total": 1920, "train": 1440}
    assert bench.update_flops("trl_ppo", setup, 1) == bench.update_flops("ours", setup, 1)
    assert bench.update_flops("ours_shared", setup, 1) == bench.update_flops("trl_grpo", setup, 1)


def test_trunk_params_count_a_gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # tied: the embedding matrix is counted once, as the LM head the policy's FLOPs pass through
    assert bench.trunk_params(config) + 32 * 64 == sum(p.numel() for p in model.parameters())


def test_mfu_is_the_update_flops_over_time_and_peak():
    setup = {"prompts_per_update": 2, "epochs": 2, "prompt_tokens_mean": 3, "policy_params": 10, "reward_params": 5}
    # 1 response token each (tokens/s / episodes/s); 1360 FLOPs in 2 s against a peak of 1e-6 GFLOP/s
    # (1000 FLOP/s): 680 / 1000
    summary = {"ours_grpo": {"tokens_per_s": 4.0, "episodes_per_s": 4.0, "seconds_per_update": 2.0}}
    assert bench.mfu("ours_grpo", summary, setup, 1e-6) == {"mfu": 0.68}
    summary["ours_grpo"]["train_seconds_per_update"] = 1.0  # 960 FLOPs in 1 s: 960 / 1000
    assert bench.mfu("ours_grpo", summary, setup, 1e-6)["mfu_train"] == 0.96


def test_setup_json_names_the_shape_of_the_model_benched(tmp_path):
    # a --model run's setup.json said hidden 128 / layers 4 (SETUP's tiny shape) beside a 135M model
    bench.build_setup(tmp_path)
    assert {k: json.loads((tmp_path / "setup.json").read_text())[k] for k in ("hidden", "layers", "heads", "ffn")} == {
        "hidden": 128,
        "layers": 4,
        "heads": 4,
        "ffn": 512,
    }
    config_path = tmp_path / "policy" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96
    )
    config_path.write_text(json.dumps(config))
    sizes = bench.model_sizes(tmp_path)
    assert (sizes["hidden"], sizes["layers"], sizes["heads"], sizes["ffn"]) == (64, 2, 2, 96)
    assert sizes["policy_params"] == bench.trunk_params(LlamaConfig.from_dict(config)) + 64 * config["vocab_size"]
