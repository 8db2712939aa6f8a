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

import logging
import time
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rlhf.checkpoint import agreed_checkpoint, checkpoint_digest, start_stage
from rlhf.config import ConfigError, PPOStageConfig, to_dict
from rlhf.distributed import is_zero3, process_state, wait_for_main
from rlhf.evaluation import evaluate_in_loop
from rlhf.finite import finite_flag
from rlhf.perf import device_peak_flops, timer
from rlhf.precision import Precision, resolve_precision
from rlhf.registry import fingerprint
from rlhf.tracking import Tracking
from stages.ppo.advantages import (
    check_estimator,
    explained_variance,
    explained_variance_sums,
    get_estimator,
    whiten_advantages,
    whitens,
)
from stages.ppo.core_algos import (
    KLController,
    RunningMoments,
    aggregate_loss,
    entropy_from_logits,
    get_policy_loss,
    kl_estimate,
    kl_penalized_rewards,
    logprobs_from_logits,
    loss_counts,
    masked,
    masked_sums,
    moments,
    value_loss,
)
from stages.ppo.engines import ENGINES, RolloutEngine, build_engine, resolve_engine
from stages.ppo.models import Models, build_models, rollout_forwards
from stages.ppo.optim import clip_gradients, drop_policy_gradients, set_lr, warmup_note
from stages.ppo.prompts import load_prompts
from stages.ppo.rollout import Rollout, Scored, in_micro_batches
from stages.ppo.run import LoopState, PPORun
from stages.ppo.sampling import episode_tensors, prompt_batch, sample_groups
from stages.ppo.saving import (
    finish_run,
    keep_if_best,
    mean_or_nan,
    resume_or_start,
    save_checkpoint,
    save_models,
)
from stages.ppo.scores import normalize_scores, score_episodes
from stages.ppo.throughput import perf_metrics, step_cost

log = logging.getLogger("rlhf.ppo")


def train(cfg: PPOStageConfig) -> dict:
    run, state = setup(cfg)
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=state.step,
        desc="ppo",
        disable=not (run.accelerator.is_main_process and cfg.tracking.progress),
        dynamic_ncols=True,
    )
    run.models.model.train()
    while state.step < cfg.train.max_steps:
        metrics = ppo_step(run, state)
        kl, beta = metrics["train/ppo/kl"], run.kl_ctl.value
        bar.set_postfix(score=f"{metrics['train/ppo/score']:.3f}", kl=f"{kl:.3f}", beta=f"{beta:.3f}")
        bar.update(1)
    bar.close()
    return finish(run, state)


def setup(cfg: PPOStageConfig) -> tuple[PPORun, LoopState]:
    """Everything the loop reads, built once, in this order (the seeded draws depend on it): the
    accelerator, the models, the prompts, the engine; then the output directory, tracking and the
    state to go on from (a checkpoint's, or a fresh one with the "before" evaluation)."""
    started = time.time()
    process_state()  # the process group, CPU-only machines included (rlhf/distributed.py)
    precision = resolve_precision(cfg.model_init)  # dtype, autocast, attention: decided once, here
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=precision.accelerator_mixed,  # None: accelerate's (`accelerate launch` config)
    )
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses
    estimator = get_estimator(cfg.ppo.advantage_estimator)  # registered names, checked before anything loads
    check_estimator(estimator, cfg)
    get_policy_loss(cfg.ppo.policy_loss)
    engine_name = resolve_engine(cfg.rollout.engine, precision)  # `auto` decided (and logged) once, here
    _registered(ENGINES, engine_name, "rollout.engine")
    models = build_models(cfg, accelerator, estimator, precision)
    data = load_prompts(cfg, models.tokenizer)
    engine = build_engine(engine_name, models.model, models.tokenizer, accelerator, precision, cfg.rollout)
    reuse_logprobs = _logprobs_from_generation(cfg, models.precision, accelerator, engine)
    log.info("rollout log-probs: %s", "from the sampling pass" if reuse_logprobs else "from a forward of the policy")
    if note := warmup_note(models.optimizer, cfg):
        log.warning(note)
    unwrapped = accelerator.unwrap_model(models.model)
    cost = step_cost(unwrapped, models.reward_model, cfg, reuse_logprobs, models.implicit_model)  # perf/mfu
    peak = device_peak_flops(accelerator.device, models.precision.matmul_dtype)  # a CPU's is measured, once
    ref_fingerprint = _reference_fingerprint(models, accelerator)  # checked again at the end
    # Everything loaded: only now take the output directory (a bad input leaves it as it was).
    digest = checkpoint_digest(cfg, (cfg.policy, cfg.reward_model, cfg.value_model, cfg.reference))  # reads manifests
    out = start_stage(cfg.output_dir, cfg, accelerator.is_main_process)
    # decided on the main process for all: every process resumes the same step
    ckpt = agreed_checkpoint(out / "checkpoints", digest, cfg.train.resume, accelerator.is_main_process)
    tracking = Tracking(cfg.tracking, out, "ppo", to_dict(cfg), accelerator.is_main_process, fresh=ckpt is None)
    run = PPORun(
        cfg=cfg,
        accelerator=accelerator,
        models=models,
        engine=engine,
        data=data,
        kl_ctl=KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon),
        running=RunningMoments(),
        out=out,
        tracking=tracking,
        cost=cost,
        peak_flops=peak,
        ref_fingerprint=ref_fingerprint,
        started=started,
    )
    state = resume_or_start(run, ckpt)
    if models.reward_client is not None:  # a resumed run is scored by the model it was scored by
        state.reward_fingerprint = models.reward_client.check(state.reward_fingerprint)
    engine.update_weights(models.model)  # a resumed policy's weights (the engine was built before they loaded)
    return run, state


def ppo_step(run: PPORun, state: LoopState) -> dict:
    """One iteration: steps 1–5 (`make_rollout`), 6 (`ppo_update`), then β's update and step 7
    (`_log_and_save`); advances `state`. Returns the step's metrics."""
    cfg, accelerator, models = run.cfg, run.accelerator, run.models
    step, device = state.step, accelerator.device
    timings: dict[str, float] = {}  # seconds per phase (rlhf/perf.py `timer`): generate, score, train, sync
    set_lr(models.optimizer, step, cfg)
    batch = prompt_batch(len(run.data.prompt_ids), step, cfg.rollout.prompts_per_step, accelerator, cfg.seed)
    rollout, scored, sampling = make_rollout(run, batch, step, timings)
    with timer("train", timings, device):
        run.engine.sleep()  # an engine's own GPU memory goes back to the trainer meanwhile
        stats = ppo_update(models.model, models.optimizer, accelerator, rollout, cfg, step, kl_coef=run.kl_ctl.value)
    stats.update(sampling)
    with timer("sync", timings, device):
        run.engine.update_weights(models.model)  # the next rollout samples from the updated policy

    seq_kl = accelerator.gather(rollout.kl.sum(1)).mean().item()
    run.kl_ctl.update(seq_kl, rollout.scores.shape[0] * accelerator.num_processes)
    state.kl_history = [*state.kl_history, seq_kl][-10:]
    state.step = step + 1
    metrics = step_metrics(run, rollout, scored, stats, timings)
    metrics.update(perf_metrics(run.cost, rollout, round(stats["epochs_run"]), timings, run.peak_flops, accelerator))
    _log_and_save(run, state, metrics, rollout, scored)
    return metrics


def finish(run: PPORun, state: LoopState) -> dict:
    """The end: the reference unchanged and the weights finite, the models saved, the held-out
    evaluation, eval.json and the manifest (`finish_run`); then the engine and accelerate torn down."""
    accelerator, models = run.accelerator, run.models
    ref_after = _reference_fingerprint(models, accelerator)
    if ref_after != run.ref_fingerprint:
        raise RuntimeError(f"the frozen reference changed during PPO ({run.ref_fingerprint} -> {ref_after})")
    _stop_if_not_finite(accelerator, state.step, weights=finite_flag(models.model.parameters()))
    save_models(run, run.out)
    result = finish_run(run, state)
    run.tracking.finish()
    wait_for_main()  # the held-out evaluation of the saved policy ran on the main process alone
    # vLLM's own teardown first: it destroys its process groups and the default one it shares,
    # which the trainer's teardown then finds gone (and skips) instead of the other way round
    run.engine.close()
    accelerator.end_training()
    return result


def make_rollout(
    run: PPORun, batch: list[int], step: int, timings: dict[str, float] | None = None
) -> tuple[Rollout, Scored, dict]:
    """Steps 1–5 for this process's prompts `batch`: (rollout, what step 3 said, what dynamic
    sampling did); step 1's seconds go to timings["generate"], steps 2–5's to timings["score"]. The
    rollout holds samples_per_prompt episodes per prompt, adjacent."""
    cfg, accelerator, models, device = run.cfg, run.accelerator, run.models, run.accelerator.device
    timings = {} if timings is None else timings
    with timer("generate", timings, device):
        # 1. generate n responses per prompt, keeping the sampled tokens' log-probs when they equal what a
        #    forward of the policy would give, or when they are compared to it (an engine of its own, TIS)
        reuse_logprobs = _logprobs_from_generation(cfg, models.precision, accelerator, run.engine)
        with_logprobs = reuse_logprobs or run.engine.own_weights or cfg.rollout.importance_correction == "tis"
        batch, sampled, sampling = sample_groups(run, batch, step, with_logprobs)
        response = sampled.response_ids
        input_ids, attention_mask, resp_mask, has_eos = episode_tensors(sampled, models.tokenizer)

    with timer("score", timings, device):
        # 2. log-probs under policy and reference; values (the math on them in fp32, whatever the
        #    models compute in), rollout.forward_batch_size episodes at a time
        forwards = partial(
            rollout_forwards,
            models.model,
            models.ref_policy,
            accelerator,
            temperature=cfg.rollout.generation.temperature,
            with_logprobs=not reuse_logprobs,
        )
        logprobs, ref_logprobs, values = in_micro_batches(
            forwards, cfg.rollout.forward_batch_size, input_ids, attention_mask, response
        )  # (B, R) each
        if reuse_logprobs:
            logprobs = sampled.logprobs.masked_fill(resp_mask == 0, 0.0)  # (B, R)
        engine_logprobs = None if sampled.logprobs is None else sampled.logprobs.masked_fill(resp_mask == 0, 0.0)

        # 3. score: reward model at the response's last real token, rule rewards, EOS penalty (a DPO
        #    model's implicit reward reads the reference's log-probs, which are these at temperature 1)
        at_temperature_1 = cfg.rollout.generation.temperature == 1.0
        scored = score_episodes(
            run, batch, input_ids, attention_mask, response, has_eos, ref_logprobs if at_temperature_1 else None
        )
        scores = normalize_scores(scored.raw_scores, accelerator.gather(scored.raw_scores), cfg.reward, run.running)

        # 4. KL-penalised per-token rewards (with ppo.kl_in: loss the KL is a loss term instead: β = 0 here);
        # 5. advantages (and returns), whitened if the estimator or ppo.whiten_advantages says so
        kl = masked(kl_estimate(logprobs, ref_logprobs, cfg.ppo.kl_estimator), resp_mask)  # (B, R)
        beta = run.kl_ctl.value if cfg.ppo.kl_in == "reward" else 0.0
        rewards = kl_penalized_rewards(scores, kl, beta, resp_mask)  # (B, R)
        estimator = get_estimator(cfg.ppo.advantage_estimator)
        advantages, returns = estimator.fn(
            rewards, values, resp_mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam, group_size=cfg.rollout.samples_per_prompt
        )
        if whitens(estimator, cfg):
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
        engine_logprobs=engine_logprobs,
        values=values,
        kl=kl,
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns if values is not None else None,
    )
    return rollout, scored, sampling


def ppo_update(
    model, optimizer, accelerator, rollout: Rollout, cfg: PPOStageConfig, step: int, kl_coef: float = 0.0
) -> dict:
    """Step 6: `ppo.epochs` passes over the rollout in `ppo.minibatches` shuffled minibatches; one
    optimizer step per minibatch, whose `train.grad_accum` equal micro-batches accumulate (the
    config check makes the minibatch divisible by grad_accum, as veRL asserts: accelerate and
    DeepSpeed count micro-batches, so any other number would step mid-minibatch and carry a
    partial gradient into the next one). kl_coef: β, for `ppo.kl_in: loss`. Returns mean statistics.

    Every micro-batch's losses are divided by the whole minibatch's counts (its tokens, or sequences,
    on every process), then multiplied by grad_accum × processes, which accelerate's backward divides
    by grad_accum and DDP (or DeepSpeed) averages over processes: the gradient is that of one token
    mean over the minibatch, however it is split (a mean of micro-batch means weighs a token of a short
    micro-batch more)."""
    B = rollout.response_ids.shape[0]
    mb_size = B // cfg.ppo.minibatches
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    totals: dict[str, list[float]] = {}
    epochs_run = 0
    warming_up = step < cfg.ppo.value_warmup_steps and len(optimizer.param_groups) > 1
    scale = cfg.train.grad_accum * accelerator.num_processes  # undone by accumulation and the process average
    for _epoch in range(cfg.ppo.epochs):
        epoch_kl = []
        for order in torch.randperm(B, generator=generator).split(mb_size):
            counts = minibatch_counts(rollout, order, cfg, accelerator)
            for idx in order.tensor_split(cfg.train.grad_accum):  # exactly grad_accum micro-batches
                mb = rollout.select(idx.to(rollout.input_ids.device))
                with accelerator.accumulate(model):
                    loss, stats = minibatch_loss(model, mb, cfg, kl_coef=kl_coef, counts=counts, scale=scale)
                    _stop_if_not_finite(accelerator, step, loss=loss.detach())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if warming_up:
                            drop_policy_gradients(optimizer)
                        clip_gradients(accelerator, model, cfg)
                        # under DeepSpeed the engine holds the gradients (p.grad is None): the loss check stands
                        grads = (p.grad for p in model.parameters() if p.grad is not None)
                        _stop_if_not_finite(accelerator, step, gradients=finite_flag(grads))
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in stats.items():
                    totals.setdefault(k, []).append(v.item())
                epoch_kl.append(stats["approx_kl"].item())
        epochs_run += 1
        mean_kl = accelerator.reduce(torch.tensor(mean_or_nan(epoch_kl), device=accelerator.device), "mean").item()
        if cfg.ppo.max_approx_kl is not None and mean_kl > cfg.ppo.max_approx_kl:
            break  # early stop: the policy moved too far from the one that sampled the rollout
    out = {k: mean_or_nan(v) for k, v in totals.items()}
    out["epochs_run"] = float(epochs_run)
    return {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in out.items()}


def minibatch_counts(rollout: Rollout, order: torch.Tensor, cfg: PPOStageConfig, accelerator) -> torch.Tensor:
    """The `loss_counts` of the minibatch `order` on every process (summed across them): what each of
    its micro-batches' losses is divided by."""
    mask = rollout.loss_mask[order.to(rollout.loss_mask.device)]
    return accelerator.reduce(loss_counts(mask, cfg.rollout.generation.max_new_tokens), "sum")


def minibatch_loss(
    model,
    mb: Rollout,
    cfg: PPOStageConfig,
    kl_coef: float = 0.0,
    counts: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + vf_coef · clipped value loss − entropy_coef · entropy (+ β·KL with
    `ppo.kl_in: loss`) on one micro-batch's loss tokens, and its statistics (no value terms
    without a critic). counts: the whole minibatch's `loss_counts` (None: this micro-batch's own);
    scale multiplies the loss terms (`ppo_update`: grad_accum × processes)."""
    ppo, max_len = cfg.ppo, cfg.rollout.generation.max_new_tokens
    counts = loss_counts(mb.loss_mask, max_len) if counts is None else counts
    logits, values = model(mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
    logits = logits.float() / cfg.rollout.generation.temperature
    new_logprobs = logprobs_from_logits(logits, mb.response_ids)
    tis = None
    if cfg.rollout.importance_correction == "tis":
        # truncated importance weight of the sampler's mismatch, per token, a constant (Yao et al. 2025)
        tis = torch.exp(mb.logprobs - mb.engine_logprobs).clamp(max=cfg.rollout.tis_cap).detach()  # (B, R)
    clip_low = ppo.clip_range if ppo.clip_range_low is None else ppo.clip_range_low
    clip_high = ppo.clip_range if ppo.clip_range_high is None else ppo.clip_range_high
    pg_loss, pg = get_policy_loss(ppo.policy_loss)(
        new_logprobs,
        mb.logprobs,
        mb.advantages,
        mb.loss_mask,
        clip_low,
        clip_range_high=clip_high,
        agg=ppo.loss_agg,
        max_len=max_len,
        weights=tis,
        counts=counts,
    )
    with torch.set_grad_enabled(torch.is_grad_enabled() and ppo.entropy_coef != 0):  # else a statistic only
        entropy = aggregate_loss(entropy_from_logits(logits), mb.loss_mask, "token_mean", counts=counts)
    loss = pg_loss - ppo.entropy_coef * entropy
    stats = {"policy_loss": pg_loss, "entropy": entropy, "clipfrac": pg["clipfrac"], "approx_kl": pg["approx_kl"]}
    if ppo.kl_in == "loss":
        # β·KL(π_θ ‖ ref) as a loss term (GRPO, Shao et al. 2024, eq. 4; estimators: Schulman 2020), on the fresh
        # log-probs so that it has a gradient: k3's, (1 − π_ref/π_θ)·∇log π_θ, is that of KL(ref ‖ π_θ) at on-policy
        # tokens and pulls toward the reference; k2's, log(π_θ/π_ref)·∇log π_θ, is exactly ∇KL(π_θ ‖ ref).
        kl_loss = aggregate_loss(
            kl_estimate(new_logprobs, mb.ref_logprobs, ppo.kl_estimator), mb.loss_mask, ppo.loss_agg, max_len, counts
        )
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    if values is not None:
        vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.loss_mask, cfg.ppo.value_clip_range, counts)
        loss = loss + cfg.ppo.vf_coef * vf_loss
        stats.update({"value_loss": vf_loss, "value_clipfrac": vf["clipfrac"]})
    stats["ratio"] = pg["ratio"]
    for term in ("policy_loss", "entropy", "kl_loss", "value_loss"):  # logged as this part's share, scaled
        if term in stats:
            stats[term] = stats[term] * scale
    return loss * scale, stats


def step_metrics(run: PPORun, rollout: Rollout, scored: Scored, stats: dict, timings: dict) -> dict:
    """Step 7's numbers, averaged over every process's episodes: `train/ppo/…`."""
    accelerator, optimizer = run.accelerator, run.models.optimizer
    gather_mean = lambda t: accelerator.gather(t).float().mean().item()  # noqa: E731
    mask, n_episodes = rollout.response_mask, rollout.scores.shape[0] * accelerator.num_processes
    n_tokens = accelerator.gather(mask.sum()).sum().item()
    elapsed = max(sum(timings.values()), 1e-9)
    k3 = masked(kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k3"), mask)
    metrics = {
        "train/ppo/score": gather_mean(scored.raw_scores),
        "train/ppo/reward": gather_mean(rollout.rewards.sum(1)),
        "train/ppo/kl": gather_mean(rollout.kl.sum(1)),
        "train/ppo/kl_k3": gather_mean(k3.sum(1)),
        "train/ppo/beta": run.kl_ctl.value,
        "train/ppo/response_length": gather_mean(mask.sum(1).float()),
        "train/ppo/eos_rate": gather_mean(scored.has_eos.float()),
        "train/ppo/lr_policy": optimizer.param_groups[0]["lr"],
        **{f"train/ppo/time_{phase}_s": seconds for phase, seconds in timings.items()},  # each timed phase
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
    if rollout.engine_logprobs is not None:
        metrics.update(logprob_diff(rollout, accelerator))
    for name, values in scored.components.items():  # every reward source, and the overlong penalty
        metrics[f"train/reward/{name}"] = gather_mean(values)
    if scored.gold_scores is not None:
        gold = accelerator.gather(scored.gold_scores)
        if not gold.isnan().all():  # the share right among the sampled responses whose prompt has an answer
            metrics["train/ppo/gold"] = gold.nanmean().item()
    return metrics


def logprob_diff(rollout: Rollout, accelerator) -> dict:
    """How far the engine's log-probs of the sampled tokens are from the trainer's (the rollout's
    `logprobs`), |Δ| over every process's response tokens: 0 up to rounding when the trainer's
    own module sampled in fp32; the size of the off-policy gap an engine of its own leaves."""
    diff = masked((rollout.logprobs - rollout.engine_logprobs).abs(), rollout.response_mask)  # (B, R)
    total = accelerator.reduce(torch.stack([diff.sum(), rollout.response_mask.sum().float()]), "sum")
    biggest = accelerator.gather(diff.max()[None]).max()  # reduce has no "max"
    mean = (total[0] / total[1].clamp(min=1)).item()
    return {"rollout/logprob_diff_mean": mean, "rollout/logprob_diff_max": biggest.item()}


def _log_and_save(run: PPORun, state: LoopState, metrics: dict, rollout: Rollout, scored: Scored) -> None:
    """Step 7: log the step's metrics and a few samples, evaluate held-out prompts, checkpoint."""
    cfg, accelerator, models, tracking, step = run.cfg, run.accelerator, run.models, run.tracking, state.step
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
            run.data.eval_examples,
            cfg.task.name,
            cfg.generation,
        )
        tracking.log(evaluation, step=step)
        if cfg.train.keep_best:
            keep_if_best(run, state, evaluation)
    if cfg.train.save_every and step % cfg.train.save_every == 0:
        _stop_if_not_finite(accelerator, step, weights=finite_flag(models.model.parameters()))
        save_checkpoint(run, state)


def _logprobs_from_generation(cfg: PPOStageConfig, precision: Precision, accelerator, engine: RolloutEngine) -> bool:
    """Whether the rollout's log-probs come from the sampling pass (`rollout.logprobs_from_generation`;
    null: when they equal the training forward's up to fp32 rounding: the trained module sampled
    them (not an engine's own copy with its own kernels), with fp32 weights and no mixed precision,
    which accelerate applies to the training forward, not to generate). true with an engine of its
    own (`rollout.engine: auto` decided so) is refused: π_old must be a forward of the trained module."""
    if cfg.rollout.logprobs_from_generation and engine.own_weights:
        raise ConfigError(
            "rollout.logprobs_from_generation",
            "must not be true with an engine holding its own copy of the weights (rollout.engine resolved to "
            "one): PPO's π_old must be a forward of the trained module; set it to null",
        )
    if cfg.rollout.logprobs_from_generation is not None:
        return cfg.rollout.logprobs_from_generation
    return not engine.own_weights and precision.dtype == torch.float32 and accelerator.mixed_precision == "no"


def _reference_fingerprint(models: Models, accelerator) -> str | None:
    """A checksum of the frozen reference (its own copy, or the policy without its adapter); None
    under ZeRO-3, which shards the weights."""
    reference = models.ref_policy or accelerator.unwrap_model(models.model).policy
    return None if is_zero3(accelerator) else fingerprint(reference, frozen_only=True)


def _stop_if_not_finite(accelerator, step: int, **tensors) -> None:
    """A NaN or inf anywhere stops the run (on every process) before it reaches the weights."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "sum")
    if flag.item() > 0:
        raise FloatingPointError(
            f"PPO step {step}: non-finite {', '.join(bad) or 'values on another process'}; stopping before the "
            "optimizer step so the weights stay intact. Check the reward model's scores and lower optim.lr."
        )


def _registered(table: dict, name: str, key: str):
    if name not in table:
        raise ConfigError(key, f"unknown {name!r}; known: {sorted(table)}")
    return table[name]
