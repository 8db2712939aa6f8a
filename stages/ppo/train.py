"""Stage 3: PPO on the SFT policy, rewarded by the reward model (and rule rewards), with a KL
penalty to the frozen reference (InstructGPT; Ziegler et al. 2019). Written on torch +
accelerate; one file, top to bottom. Each iteration:

  1. generate responses to a batch of prompts with the rollout engine (sampling from config),
     `rollout.samples_per_prompt` per prompt (groups), dropping groups of equal scores under
     `rollout.dynamic_sampling`
  2. log-probs under the policy and the reference, values from the value model
  3. score prompt + response with the reward model and the rule rewards
  4. per-token rewards: −β·KL(policy ‖ ref) at every token (unless `ppo.kl_in: loss`), plus the
     score at the last token
  5. advantages (and returns) by the configured estimator, GAE(γ, λ) by default; whitened
  6. PPO epochs over minibatches: clipped surrogate + clipped value loss (− entropy bonus, + β·KL
     with `ppo.kl_in: loss`), stopping early if the approximate KL runs away
  7. log, adapt β, checkpoint, evaluate on held-out prompts

Steps 1–5 are `make_rollout`, step 6 is `ppo_update`. The variation points are registries:
rollout engines (stages/ppo/engines.py), advantage estimators (stages/ppo/advantages.py) and
tasks (rlhf/tasks/).

    accelerate launch launch/stage3_ppo.py --config configs/tiny/ppo.yaml policy=runs/x/sft reward_model=runs/x/rm
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rlhf.checkpoint import agreed_checkpoint, checkpoint_digest, finish_stage, start_stage
from rlhf.config import ConfigError, PPOStageConfig, to_dict
from rlhf.data import load_records, normalize_sft
from rlhf.data.prompts import normalize_prompts
from rlhf.distributed import is_zero3, process_state
from rlhf.evaluation import evaluate_directory, evaluate_in_loop, flatten_metrics, summary
from rlhf.generation import render_prompts
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import sequence_scores
from rlhf.reward_functions import call_reward_function, row_fields
from rlhf.tasks import RULES, task_records
from rlhf.tracking import Tracking
from stages.ppo.advantages import ESTIMATORS, Estimator, explained_variance, explained_variance_sums
from stages.ppo.engines import ENGINES, Generated, RolloutEngine, build_engine
from stages.ppo.kl import KLController, kl_estimate, kl_penalized_rewards
from stages.ppo.losses import aggregate_loss, entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from stages.ppo.masked import masked_mean, masked_sums, masked_whiten, moments
from stages.ppo.models import Models, build_models, fingerprint, reference_logits
from stages.ppo.optim import clip_gradients, set_lr
from stages.ppo.rollout import Rollout, Scored, response_mask
from stages.ppo.saving import save_checkpoint, save_models
from stages.ppo.scores import (
    RunningMoments,
    combine_scores,
    normalize_scores,
    overlong_penalty,
    remote_model_scores,
)

log = logging.getLogger("rlhf.ppo")


@dataclass(kw_only=True)
class Prompts:
    prompts: list[dict]  # normalised chat prompts for training
    prompt_ids: list[list[int]]  # their rendered token ids
    eval_examples: list[dict]  # held-out prompts with a reference completion
    train_source: str
    eval_source: str


def train(cfg: PPOStageConfig) -> dict:
    process_state()  # the process group, CPU-only machines included (rlhf/distributed.py)
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=precision.mixed,  # None: accelerate's (`accelerate launch` config)
    )
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses
    started = time.time()
    estimator = _registered(ESTIMATORS, cfg.ppo.advantage_estimator, "ppo.advantage_estimator")
    _check_estimator(estimator, cfg)
    _registered(ENGINES, cfg.rollout.engine, "rollout.engine")
    models = build_models(cfg, accelerator, estimator, precision)
    data = load_prompts(cfg, models.tokenizer)
    engine = build_engine(cfg.rollout.engine, models.model, models.tokenizer, accelerator)
    kl_ctl = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    running = RunningMoments()
    reuse_logprobs = _logprobs_from_generation(cfg, models.precision, accelerator)
    log.info("rollout log-probs: %s", "from the sampling pass" if reuse_logprobs else "from a forward of the policy")
    # A checksum of the reference, checked again at the end (ZeRO-3 shards weights: not checked there).
    reference = models.ref_policy or accelerator.unwrap_model(models.model).policy
    ref_fingerprint = None if is_zero3(accelerator) else fingerprint(reference, frozen_only=True)
    # Everything loaded: only now take the output directory (a bad input leaves it as it was).
    digest = checkpoint_digest(cfg, (cfg.policy, cfg.reward_model, cfg.value_model))  # reads the inputs' manifests
    out = start_stage(cfg.output_dir, cfg, accelerator.is_main_process)
    state, tracking = resume_or_start(cfg, accelerator, models, data, kl_ctl, running, out, digest)

    bar = tqdm(
        total=cfg.train.max_steps,
        initial=state["step"],
        desc="ppo",
        disable=not (accelerator.is_main_process and cfg.tracking.progress),
        dynamic_ncols=True,
    )
    models.model.train()
    while state["step"] < cfg.train.max_steps:
        step, t0 = state["step"], time.time()
        set_lr(models.optimizer, step, cfg)
        batch = _prompt_batch(len(data.prompt_ids), step, cfg.rollout.prompts_per_step, accelerator, cfg.seed)
        rollout, scored, sampling, t_gen = make_rollout(
            models, engine, data, batch, cfg, kl_ctl, running, accelerator, step
        )
        t_score = time.time()
        stats = ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step, kl_coef=kl_ctl.value)
        stats.update(sampling)
        engine.update_weights(models.model)
        t_train = time.time()

        seq_kl = accelerator.gather(rollout.kl.sum(1)).mean().item()
        kl_ctl.update(seq_kl, rollout.scores.shape[0] * accelerator.num_processes)
        state["kl_history"] = (state["kl_history"] + [seq_kl])[-10:]
        state["step"] = step + 1
        timings = {"generate": t_gen - t0, "score": t_score - t_gen, "train": t_train - t_score}
        metrics = step_metrics(rollout, scored, stats, kl_ctl, models.optimizer, accelerator, timings)
        _log_and_save(cfg, state, metrics, rollout, scored, models, data, kl_ctl, running, accelerator, tracking, out)
        bar.set_postfix(score=f"{metrics['train/ppo/score']:.3f}", kl=f"{seq_kl:.3f}", beta=f"{kl_ctl.value:.3f}")
        bar.update(1)
    bar.close()

    ref_after = None if is_zero3(accelerator) else fingerprint(reference, frozen_only=True)
    if ref_after != ref_fingerprint:
        raise RuntimeError(f"the frozen reference changed during PPO ({ref_fingerprint} -> {ref_after})")
    _stop_if_not_finite(accelerator, state["step"], weights=_finite_flag(models.model.parameters()))
    save_models(accelerator, models.model, models.tokenizer, models.policy_source, out, cfg, models.precision)
    result = _finish(cfg, accelerator, state, kl_ctl, ref_fingerprint, data, tracking, out, models, started)
    tracking.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def make_rollout(
    models: Models,
    engine: RolloutEngine,
    data: Prompts,
    batch: list[int],
    cfg: PPOStageConfig,
    kl_ctl: KLController,
    running: RunningMoments,
    accelerator,
    step: int,
) -> tuple[Rollout, Scored, dict, float]:
    """Steps 1–5 for this process's prompts `batch`: (rollout, what step 3 said, what dynamic
    sampling did, time when generation ended). The rollout holds samples_per_prompt episodes per
    prompt, adjacent."""
    gen, tokenizer, model = cfg.rollout.generation, models.tokenizer, models.model
    # 1. generate n responses per prompt, keeping the sampled tokens' log-probs when they equal what
    #    a forward of the policy would give
    reuse_logprobs = _logprobs_from_generation(cfg, models.precision, accelerator)
    batch, sampled, sampling = sample_groups(models, engine, data, batch, cfg, accelerator, step, reuse_logprobs)
    response = sampled.response_ids
    R = response.shape[1]
    input_ids, attention_mask, resp_mask, has_eos = _episode_tensors(sampled, tokenizer)
    t_gen = time.time()

    # 2. log-probs under policy and reference; values (the math on them in fp32, whatever the
    #    models compute in)
    with torch.no_grad(), accelerator.autocast():
        logits, values = model(input_ids, attention_mask, R, with_logits=not reuse_logprobs)
        if reuse_logprobs:
            logprobs = sampled.logprobs.masked_fill(resp_mask == 0, 0.0)  # (B, R)
        else:
            logprobs = logprobs_from_logits(logits.float() / gen.temperature, response)  # (B, R)
        ref = reference_logits(accelerator.unwrap_model(model), models.ref_policy, input_ids, attention_mask, R)
        ref_logprobs = logprobs_from_logits(ref.float() / gen.temperature, response)  # (B, R)
        del logits, ref

    # 3. score: reward model at the response's last real token, rule rewards, EOS penalty
    scored = _score(models, data, batch, input_ids, attention_mask, response, has_eos, cfg, accelerator)
    scores = normalize_scores(scored.raw_scores, accelerator.gather(scored.raw_scores), cfg.reward, running)

    # 4. KL-penalised per-token rewards (with ppo.kl_in: loss the KL is a loss term instead: β = 0 here);
    # 5. advantages (and returns), whitened if the estimator or ppo.whiten_advantages says so
    kl = kl_estimate(logprobs, ref_logprobs, cfg.ppo.kl_estimator) * resp_mask  # (B, R)
    rewards = kl_penalized_rewards(scores, kl, kl_ctl.value if cfg.ppo.kl_in == "reward" else 0.0, resp_mask)  # (B, R)
    estimator = ESTIMATORS[cfg.ppo.advantage_estimator]
    advantages, returns = estimator.fn(
        rewards, values, resp_mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam, group_size=cfg.rollout.samples_per_prompt
    )
    if _whiten(estimator, cfg):
        advantages = whiten_advantages(advantages, resp_mask, accelerator)  # over every process's tokens
    _stop_if_not_finite(accelerator, step, scores=scores, rewards=rewards, advantages=advantages)
    rollout = Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_ids=response,
        response_mask=resp_mask,
        # DAPO's overlong filtering: responses cut off at max_new_tokens teach nothing either way
        loss_mask=resp_mask * has_eos[:, None] if cfg.ppo.mask_truncated else resp_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        kl=kl,
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns if values is not None else None,
    )
    return rollout, scored, sampling, t_gen


def sample_groups(models, engine, data, batch, cfg, accelerator, step: int, with_logprobs: bool):
    """Step 1: (episodes, sampled, stats): samples_per_prompt responses to each prompt of `batch`,
    adjacent, and each row's prompt index. With rollout.dynamic_sampling (DAPO, Yu et al. 2025,
    §3.2) they are scored first (step 3 scores the kept rows again) and groups whose scores are all
    equal are dropped: they give every response a zero advantage. More prompts are drawn, from a
    stream seeded per try so a resumed run draws the same, until every process holds
    prompts_per_step groups or max_sampling_tries rounds ran; a process still short fills up with
    dropped groups (as veRL keeps shapes fixed; it raises instead)."""
    roll, n = cfg.rollout, cfg.rollout.samples_per_prompt

    def draw(prompts: list[int]) -> tuple[list[int], Generated]:
        episodes = [i for i in prompts for _ in range(n)]
        return episodes, engine.generate([data.prompt_ids[i] for i in episodes], roll.generation, with_logprobs)

    if not roll.dynamic_sampling:
        episodes, sampled = draw(batch)
        return episodes, sampled, {}
    kept, dropped = [], []  # (sampled, group index within it, prompt index)
    tries = 0
    while tries < roll.max_sampling_tries:
        seed = cfg.seed + 1_000_003 * tries  # try 0 is the usual stream
        prompts = batch if tries == 0 else _prompt_batch(len(data.prompt_ids), step, len(batch), accelerator, seed)
        episodes, sampled = draw(prompts)
        tries += 1
        input_ids, attention_mask, _, has_eos = _episode_tensors(sampled, models.tokenizer)
        raw = _score(models, data, episodes, input_ids, attention_mask, sampled.response_ids, has_eos, cfg, accelerator)
        groups = raw.raw_scores.view(-1, n)
        for g, spread in enumerate((groups.max(1).values > groups.min(1).values).tolist()):
            (kept if spread else dropped).append((sampled, g, prompts[g]))
        fewest = accelerator.gather(torch.tensor([len(kept)], device=accelerator.device)).min().item()
        if fewest >= len(batch):
            break
    n_dropped = accelerator.reduce(torch.tensor(float(len(dropped)), device=accelerator.device), "sum").item()
    chosen = (kept + dropped)[: len(batch)]
    episodes = [prompt for _, _, prompt in chosen for _ in range(n)]
    stats = {"dropped_groups": n_dropped, "sampling_tries": float(tries)}
    return episodes, _cat_groups(chosen, n, models.tokenizer.pad_token_id), stats


def _cat_groups(chosen: list, n: int, pad_id: int) -> Generated:
    """The rows of the chosen groups (sampled, group index, _) as one batch: prompts left-padded and
    responses right-padded with the pad id to the widest. A response cut off at max_new_tokens is
    already the widest, so padding never follows one (an EOS-valued pad cannot fake its end)."""
    P = max(s.prompt_ids.shape[1] for s, _, _ in chosen)
    R = max(s.response_ids.shape[1] for s, _, _ in chosen)
    prompts, responses, logprobs = [], [], []
    for s, g, _ in chosen:
        rows = slice(g * n, (g + 1) * n)
        prompts.append(torch.nn.functional.pad(s.prompt_ids[rows], (P - s.prompt_ids.shape[1], 0), value=pad_id))
        responses.append(torch.nn.functional.pad(s.response_ids[rows], (0, R - s.response_ids.shape[1]), value=pad_id))
        if s.logprobs is not None:
            logprobs.append(torch.nn.functional.pad(s.logprobs[rows], (0, R - s.logprobs.shape[1]), value=0.0))
    return Generated(
        prompt_ids=torch.cat(prompts),
        response_ids=torch.cat(responses),
        logprobs=torch.cat(logprobs) if logprobs else None,
    )


def _episode_tensors(sampled: Generated, tokenizer):
    """(input_ids (B, P + R), attention_mask (B, P + R), response mask (B, R), has_eos (B,))."""
    query, response = sampled.prompt_ids, sampled.response_ids
    resp_mask, has_eos = response_mask(response, tokenizer.eos_token_id)  # (B, R), (B,)
    # left pads are the only pads in a left-padded prompt; the pad id never appears inside one
    input_ids = torch.cat([query, response], dim=1)  # (B, P + R)
    attention_mask = torch.cat([(query != tokenizer.pad_token_id).long(), resp_mask], dim=1)  # (B, P + R)
    return input_ids, attention_mask, resp_mask, has_eos


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor, accelerator) -> torch.Tensor:
    """Step 5's whitening with the mean and variance of every process's tokens, not this process's
    alone: the advantages then do not depend on how the batch is split (as OpenRLHF and veRL
    whiten the whole batch). (B, R) -> (B, R), 0 on padding."""
    return masked_whiten(advantages, mask, sums=accelerator.reduce(masked_sums(advantages, mask), "sum"))


def _score(models, data, batch, input_ids, attention_mask, response, has_eos, cfg, accelerator) -> Scored:
    """Step 3: one score per response from the reward model, the rule rewards, the reward
    functions and the remote reward model (+ the missing-EOS penalty), before normalisation."""
    texts = models.tokenizer.batch_decode(response, skip_special_tokens=True)
    rows = [data.prompts[i] for i in batch]
    prompts = [row["prompt"] for row in rows]  # chat messages
    questions = [p[-1]["content"] for p in prompts]
    model_scores = None
    if models.reward_model is not None:
        with torch.no_grad(), accelerator.autocast():
            model_scores = sequence_scores(models.reward_model, input_ids, attention_mask)
    device = accelerator.device
    rules = {name: torch.tensor(RULES[name](questions, texts), device=device) for name in cfg.reward.rules}
    fields = row_fields(rows)  # answer, tests, …: the prompt rows' other fields, one list each
    functions = {
        spec: torch.tensor(call_reward_function(spec, prompts, texts, fields), device=device, dtype=torch.float32)
        for spec in cfg.reward.functions
    }
    remote = remote_model_scores(cfg.reward.remote, prompts, texts, accelerator) if cfg.reward.remote.url else None
    raw = combine_scores(model_scores, rules, has_eos, cfg.reward, functions, remote)  # (B,)
    if cfg.reward.overlong_buffer is not None:  # DAPO's soft overlong punishment, logged as a rule
        lengths = attention_mask[:, -response.shape[1] :].sum(1)
        rules["overlong"] = overlong_penalty(lengths, cfg.rollout.generation.max_new_tokens, cfg.reward)
        raw = raw + rules["overlong"]
    return Scored(
        raw_scores=raw,
        model_scores=model_scores,
        rule_scores=rules,
        function_scores=functions,
        remote_scores=remote,
        has_eos=has_eos,
        questions=questions,
        texts=texts,
    )


def ppo_update(
    model, optimizer, accelerator, rollout: Rollout, cfg: PPOStageConfig, step: int, kl_coef: float = 0.0
) -> dict:
    """Step 6: `ppo.epochs` passes over the rollout in `ppo.minibatches` shuffled minibatches; one
    optimizer step per minibatch, whose `train.grad_accum` equal micro-batches accumulate (the
    config check makes the minibatch divisible by grad_accum, as veRL asserts: accelerate and
    DeepSpeed count micro-batches, so any other number would step mid-minibatch and carry a
    partial gradient into the next one). kl_coef: β, for `ppo.kl_in: loss`. Returns mean statistics."""
    B = rollout.response_ids.shape[0]
    mb_size = B // cfg.ppo.minibatches
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    totals: dict[str, list[float]] = {}
    epochs_run = 0
    for _epoch in range(cfg.ppo.epochs):
        epoch_kl = []
        for order in torch.randperm(B, generator=generator).split(mb_size):
            for idx in order.tensor_split(cfg.train.grad_accum):  # exactly grad_accum micro-batches
                mb = rollout.select(idx.to(rollout.input_ids.device))
                with accelerator.accumulate(model):
                    loss, stats = minibatch_loss(model, mb, cfg, kl_coef=kl_coef)
                    _stop_if_not_finite(accelerator, step, loss=loss.detach())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        clip_gradients(accelerator, model, cfg)
                        # under DeepSpeed the engine holds the gradients (p.grad is None): the loss check stands
                        grads = (p.grad for p in model.parameters() if p.grad is not None)
                        _stop_if_not_finite(accelerator, step, gradients=_finite_flag(grads))
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v.item())
                epoch_kl.append(stats["approx_kl"].item())
        epochs_run += 1
        mean_kl = accelerator.reduce(torch.tensor(_mean(epoch_kl), device=accelerator.device), "mean").item()
        if cfg.ppo.max_approx_kl is not None and mean_kl > cfg.ppo.max_approx_kl:
            break  # early stop: the policy moved too far from the one that sampled the rollout
    out = {k: _mean(v) for k, v in totals.items()}
    out["epochs_run"] = float(epochs_run)
    return {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in out.items()}


def minibatch_loss(
    model, mb: Rollout, cfg: PPOStageConfig, kl_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + vf_coef · clipped value loss − entropy_coef · entropy (+ β·KL with
    `ppo.kl_in: loss`) on one micro-batch's loss tokens, and its statistics (no value terms
    without a critic)."""
    ppo, max_len = cfg.ppo, cfg.rollout.generation.max_new_tokens
    logits, values = model(mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
    logits = logits.float() / cfg.rollout.generation.temperature
    new_logprobs = logprobs_from_logits(logits, mb.response_ids)
    clip_low = ppo.clip_range if ppo.clip_range_low is None else ppo.clip_range_low
    clip_high = ppo.clip_range if ppo.clip_range_high is None else ppo.clip_range_high
    pg_loss, pg = policy_loss(
        new_logprobs,
        mb.logprobs,
        mb.advantages,
        mb.loss_mask,
        clip_low,
        clip_range_high=clip_high,
        agg=ppo.loss_agg,
        max_len=max_len,
    )
    entropy = masked_mean(entropy_from_logits(logits), mb.loss_mask)
    loss = pg_loss - cfg.ppo.entropy_coef * entropy
    stats = {"policy_loss": pg_loss, "entropy": entropy, "clipfrac": pg["clipfrac"], "approx_kl": pg["approx_kl"]}
    if ppo.kl_in == "loss":
        # β·KL(π_θ ‖ ref) as a loss term (GRPO, Shao et al. 2024, eq. 4; estimators: Schulman 2020), on the fresh
        # log-probs so that it has a gradient: k3's, (1 − π_ref/π_θ)·∇log π_θ, is that of KL(ref ‖ π_θ) at on-policy
        # tokens and pulls toward the reference; k2's, log(π_θ/π_ref)·∇log π_θ, is exactly ∇KL(π_θ ‖ ref).
        kl_loss = aggregate_loss(
            kl_estimate(new_logprobs, mb.ref_logprobs, ppo.kl_estimator), mb.loss_mask, ppo.loss_agg, max_len
        )
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    if values is not None:
        vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.loss_mask, cfg.ppo.value_clip_range)
        loss = loss + cfg.ppo.vf_coef * vf_loss
        stats.update({"value_loss": vf_loss, "value_clipfrac": vf["clipfrac"]})
    stats["ratio"] = pg["ratio"]
    return loss, stats


def step_metrics(rollout: Rollout, scored: Scored, stats: dict, kl_ctl, optimizer, accelerator, timings: dict) -> dict:
    """Step 7's numbers, averaged over every process's episodes: `train/ppo/…`."""
    gather_mean = lambda t: accelerator.gather(t).float().mean().item()  # noqa: E731
    mask, n_episodes = rollout.response_mask, rollout.scores.shape[0] * accelerator.num_processes
    n_tokens = accelerator.gather(mask.sum()).sum().item()
    elapsed = max(sum(timings.values()), 1e-9)
    k3 = kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k3") * mask
    metrics = {
        "train/ppo/score": gather_mean(scored.raw_scores),
        "train/ppo/reward": gather_mean(rollout.rewards.sum(1)),
        "train/ppo/kl": gather_mean(rollout.kl.sum(1)),
        "train/ppo/kl_k3": gather_mean(k3.sum(1)),
        "train/ppo/beta": kl_ctl.value,
        "train/ppo/response_length": gather_mean(mask.sum(1).float()),
        "train/ppo/eos_rate": gather_mean(scored.has_eos.float()),
        "train/ppo/lr_policy": optimizer.param_groups[0]["lr"],
        "train/ppo/time_generate_s": timings["generate"],
        "train/ppo/time_score_s": timings["score"],
        "train/ppo/time_train_s": timings["train"],
        "train/ppo/tokens_per_s": n_tokens / elapsed,
        "train/ppo/episodes_per_s": n_episodes / elapsed,
        **{f"train/ppo/{k}": v for k, v in stats.items()},
    }
    if rollout.values is not None:
        # over every process's tokens, from sums all-reduced across processes
        ev_sums = accelerator.reduce(explained_variance_sums(rollout.values, rollout.returns, mask), "sum")
        metrics["train/ppo/explained_variance"] = explained_variance(rollout.values, rollout.returns, mask, ev_sums)
        value_mean, _ = moments(accelerator.reduce(masked_sums(rollout.values, mask), "sum"))
        metrics["train/ppo/value_mean"] = value_mean.item()
        metrics["train/ppo/lr_value"] = optimizer.param_groups[1]["lr"]
    if scored.model_scores is not None:
        metrics["train/ppo/rm_score"] = gather_mean(scored.model_scores)
    for name, values in scored.rule_scores.items():
        metrics[f"train/ppo/rule_{name}"] = gather_mean(values)
    for spec, values in scored.function_scores.items():
        metrics[f"train/ppo/fn_{spec.replace(':', '.')}"] = gather_mean(values)
    if scored.remote_scores is not None:
        metrics["train/ppo/remote_score"] = gather_mean(scored.remote_scores)
    return metrics


def load_prompts(cfg: PPOStageConfig, tokenizer) -> Prompts:
    """Training prompts (any SFT format; fresh task items by default) and held-out prompts with answers."""
    train_records, train_source = load_records(
        cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", seed_offset=20)
    )
    prompts = normalize_prompts(train_records)
    eval_records, eval_source = load_records(cfg.data, cfg.task, "eval")
    eval_examples = [e for e in normalize_sft(eval_records)[0] if "completion" in e] if eval_records else []
    log.info("prompts: %d from %s; held-out: %d from %s", len(prompts), train_source, len(eval_examples), eval_source)
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in prompts])
    return Prompts(
        prompts=prompts,
        prompt_ids=prompt_ids,
        eval_examples=eval_examples,
        train_source=train_source,
        eval_source=eval_source,
    )


def resume_or_start(cfg, accelerator, models: Models, data: Prompts, kl_ctl, running, out: Path, digest: str):
    """(state, tracking): the state of the newest complete checkpoint written under this config
    and these inputs (`digest`: rlhf/checkpoint.py `checkpoint_digest`), or a fresh one with the
    held-out evaluation of the starting policy ("before")."""
    state = {"step": 0, "before": None, "kl_history": []}
    # decided on the main process for all: every process resumes the same step
    ckpt = agreed_checkpoint(out / "checkpoints", digest, cfg.train.resume, accelerator.is_main_process)
    tracking = Tracking(cfg.tracking, out, "ppo", to_dict(cfg), accelerator.is_main_process, fresh=ckpt is None)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        saved = json.loads((ckpt / "ppo_state.json").read_text())
        state.update(saved["state"])
        kl_ctl.load_state_dict(saved["kl_controller"])
        running.load_state_dict(saved["running_scores"])
        log.info("resumed from %s at step %d", ckpt, state["step"])
    elif data.eval_examples and accelerator.is_main_process:
        state["before"] = _evaluate_saved(cfg.policy, cfg, data, models.precision)
        log.info("before PPO: %s", summary(state["before"]))
    accelerator.wait_for_everyone()
    return state, tracking


def _log_and_save(cfg, state, metrics, rollout, scored, models, data, kl_ctl, running, accelerator, tracking, out):
    """Step 7: log the step's metrics and a few samples, evaluate held-out prompts, checkpoint."""
    step = state["step"]
    if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
        tracking.log(metrics, step=step)
    samples_every = cfg.tracking.samples_every or cfg.train.eval_every
    if samples_every and step % samples_every == 0:
        rows = zip(scored.questions, scored.texts, scored.raw_scores.tolist(), rollout.kl.sum(1).tolist(), strict=True)
        table = [[q, t, round(s, 4), round(k, 4)] for q, t, s, k in rows][:8]
        tracking.log_table("samples/ppo", ["prompt", "response", "score", "kl"], table, step=step)
    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
        evaluation = evaluate_in_loop(
            models.model,
            models.reward_model,
            accelerator,
            models.tokenizer,
            data.eval_examples,
            cfg.task.name,
            cfg.generation,
        )
        tracking.log(evaluation, step=step)
    if cfg.train.save_every and step % cfg.train.save_every == 0:
        _stop_if_not_finite(accelerator, step, weights=_finite_flag(models.model.parameters()))
        save_checkpoint(accelerator, out / "checkpoints", state, kl_ctl, running, cfg.train.keep_checkpoints)


def _finish(cfg, accelerator, state, kl_ctl, ref_fingerprint, data: Prompts, tracking, out, models, started) -> dict:
    """Evaluate the saved policy on held-out prompts (main process), then eval.json and the manifest."""
    metrics: dict = {
        "steps": state["step"],
        "final_kl": _mean(state["kl_history"]),
        "kl_target": cfg.ppo.kl_target,
        "beta": kl_ctl.value,
        "reference_fingerprint": ref_fingerprint,
    }
    if not accelerator.is_main_process:
        return metrics
    report = None
    if data.eval_examples:
        after = _evaluate_saved(str(out), cfg, data, models.precision)
        report = {"before": state["before"], "after": after, **metrics, "eval_source": data.eval_source}
        if state["before"] and "accuracy" in after:
            report["accuracy_gain"] = round(after["accuracy"] - state["before"]["accuracy"], 4)
        tracking.log(flatten_metrics(after, "eval/ppo"), step=state["step"])
        metrics.update({"before": summary(state["before"]), "after": summary(after)})
        log.info("after PPO: %s (before: %s)", summary(after), summary(state["before"]))
    finish_stage(
        out,
        cfg,
        stage="ppo",
        model=cfg.policy,
        base_model=models.policy_source.root,
        inputs=(cfg.policy, cfg.reward_model, cfg.value_model),
        metrics=metrics,
        started=started,
        eval_report=report,
        extra={"reward_model": cfg.reward_model, "data": {"train": data.train_source, "eval": data.eval_source}},
    )
    return metrics


def _evaluate_saved(policy_dir: str, cfg: PPOStageConfig, data: Prompts, precision: Precision) -> dict:
    return evaluate_directory(
        policy_dir,
        cfg.reward_model,
        data.eval_examples,
        cfg.task.name,
        cfg.generation,
        cfg.model_init,
        precision,
        seed=cfg.seed,
    )


def _logprobs_from_generation(cfg: PPOStageConfig, precision: Precision, accelerator) -> bool:
    """Whether the rollout's log-probs come from the sampling pass (`rollout.logprobs_from_generation`;
    null: when they equal the training forward's up to fp32 rounding: fp32 weights and no mixed
    precision, which accelerate applies to the training forward, not to generate)."""
    if cfg.rollout.logprobs_from_generation is not None:
        return cfg.rollout.logprobs_from_generation
    return precision.dtype == torch.float32 and accelerator.mixed_precision == "no"


def _prompt_batch(n: int, step: int, B: int, accelerator, seed: int) -> list[int]:
    """This process's B prompt indices (of n) for `step`: a fixed seeded permutation per pass
    over the prompts, so the order is the same after a resume."""
    start = (step * accelerator.num_processes + accelerator.process_index) * B
    out = []
    for i in range(start, start + B):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(perm[pos].item())
    return out


def _stop_if_not_finite(accelerator, step: int, **tensors) -> None:
    """A NaN or inf anywhere stops the run (on every process) before it reaches the weights."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "sum")
    if flag.item() > 0:
        raise FloatingPointError(
            f"PPO step {step}: non-finite {', '.join(bad) or 'values on another process'}; stopping before the "
            "optimizer step so the weights stay intact. Check the reward model's scores and lower optim.lr."
        )


def _finite_flag(tensors) -> torch.Tensor:
    """0 if every tensor is finite, else NaN (for `_stop_if_not_finite`). Under ZeRO-3 a
    parameter's own data is this process's shard (`ds_tensor`)."""
    finite = all(bool(torch.isfinite(getattr(t, "ds_tensor", t)).all()) for t in tensors)
    return torch.tensor(0.0 if finite else float("nan"))


def _check_estimator(estimator: Estimator, cfg: PPOStageConfig) -> None:
    """What the chosen estimator asks of the rest of the config, refused before anything loads."""
    if estimator.needs_groups and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            "rollout.samples_per_prompt",
            f"{cfg.ppo.advantage_estimator} compares responses to the same prompt: needs samples_per_prompt > 1",
        )


def _whiten(estimator: Estimator, cfg: PPOStageConfig) -> bool:
    return estimator.whiten if cfg.ppo.whiten_advantages is None else cfg.ppo.whiten_advantages


def _registered(table: dict, name: str, key: str):
    if name not in table:
        raise ConfigError(key, f"unknown {name!r}; known: {sorted(table)}")
    return table[name]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
