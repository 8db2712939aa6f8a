"""Stage 3: PPO on the SFT policy, rewarded by the reward model (and rule rewards), with a KL
penalty to the frozen reference (InstructGPT; Ziegler et al. 2019). Written on torch +
accelerate; one file, top to bottom. Each iteration:

  1. generate responses to a batch of prompts with the policy (KV cache, sampling from config)
  2. log-probs under the policy and the reference, values from the value model
  3. score prompt + response with the reward model and the rule rewards
  4. per-token rewards: −β·KL(policy ‖ ref) at every token, plus the score at the last token
  5. advantages and returns by GAE(γ, λ); advantages whitened
  6. PPO epochs over minibatches: clipped surrogate + clipped value loss (− entropy bonus),
     stopping early if the approximate KL runs away
  7. log, adapt β, checkpoint, evaluate on held-out prompts

    accelerate launch launch/stage3_ppo.py --config configs/tiny/ppo.yaml policy=runs/x/sft reward_model=runs/x/rm
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from rlhf.checkpoint import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    claim_checkpoints,
    input_hashes,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
    write_manifest,
)
from rlhf.config import NOT_HASHED, ConfigError, OptimConfig, PPOStageConfig, config_hash, dump_yaml, to_dict
from rlhf.data import load_records, normalize_sft
from rlhf.data.prompts import normalize_prompts
from rlhf.distributed import is_zero3, process_state, whole_models
from rlhf.evaluation import evaluate_generations
from rlhf.generation import gathered_for_generation, generate_ids, generate_text, left_pad, render_prompts
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, mixed_precision, resolve
from rlhf.tasks import RULES, score_generations, task_records
from rlhf.tracking import Tracking
from stages.ppo.advantages import explained_variance, gae
from stages.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalized_rewards
from stages.ppo.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from stages.ppo.masked import masked_mean, masked_whiten
from stages.ppo.models import (
    PolicyAndValue,
    ValueHead,
    disable_dropout,
    freeze,
    prepare_frozen,
    reference_logits,
    reward_scores,
)
from stages.ppo.rollout import Rollout, response_mask
from stages.ppo.scores import RunningMoments, combine_scores, normalize_scores

log = logging.getLogger("rlhf.ppo")


def train(cfg: PPOStageConfig) -> dict:
    process_state()  # the process group, CPU-only machines included (rlhf/distributed.py)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=mixed_precision(cfg.model_init),  # None: accelerate's (`accelerate launch` config)
    )
    set_seed(cfg.seed, device_specific=True)  # each process samples different responses
    out = Path(cfg.output_dir)
    started = time.time()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # this directory is being rewritten
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))

    # ---- models: policy + value (trained), reference + reward model (frozen) ----------------
    policy_source = resolve(cfg.policy)
    tokenizer = load_tokenizer(policy_source, cfg.model_init)
    policy = build_policy(policy_source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed)
    ref_policy = None if cfg.lora.enabled else freeze(build_policy(policy_source, cfg.model_init, tokenizer))
    reward_model = None
    if cfg.reward_model:
        rm_source = resolve(cfg.reward_model)
        _check_same_tokenizer(tokenizer, load_tokenizer(rm_source, cfg.model_init), cfg.reward_model)
        reward_model = freeze(build_scalar_model(rm_source, cfg.model_init, tokenizer))
    if cfg.share_policy_trunk:
        value_model = ValueHead(policy.config.hidden_size, next(policy.parameters()).dtype)
    else:
        value_source = resolve(cfg.value_model or cfg.reward_model or cfg.policy)
        value_model = build_scalar_model(value_source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed)
    for m in (policy, value_model, ref_policy, reward_model):
        if m is not None:
            disable_dropout(m)

    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.AdamW(
        [_param_group(policy, cfg.optim), _param_group(value_model, cfg.value_optim)], lr=cfg.optim.lr
    )
    _fill_deepspeed_config(accelerator, cfg, policy.config.hidden_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref_policy = prepare_frozen(ref_policy, accelerator) if ref_policy is not None else None
    reward_model = prepare_frozen(reward_model, accelerator) if reward_model is not None else None
    device = accelerator.device
    # A checksum of the reference, checked again at the end (ZeRO-3 shards weights: not checked there).
    zero3 = is_zero3(accelerator)
    reference = ref_policy if ref_policy is not None else accelerator.unwrap_model(model).policy
    ref_fingerprint = None if zero3 else fingerprint(reference, frozen_only=True)

    # ---- data: training prompts and held-out prompts with answers ------------------------------
    train_records, train_source = load_records(
        cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", seed_offset=20)
    )
    prompts = normalize_prompts(train_records)
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in prompts])
    eval_records, eval_source = load_records(cfg.data, cfg.task, "eval")
    eval_examples = [e for e in normalize_sft(eval_records)[0] if "completion" in e] if eval_records else []
    log.info("prompts: %d from %s; held-out: %d from %s", len(prompts), train_source, len(eval_examples), eval_source)

    kl_ctl = (
        AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        if cfg.ppo.kl_target
        else FixedKLController(cfg.ppo.kl_coef)
    )
    running = RunningMoments()
    gen = cfg.rollout.generation
    reuse_logprobs = _logprobs_from_generation(cfg, policy, accelerator)
    log.info("rollout log-probs: %s", "from the sampling pass" if reuse_logprobs else "from a forward of the policy")
    B = cfg.rollout.prompts_per_step  # per process
    state = {"step": 0, "before": None, "kl_history": []}

    # ---- resume from the newest complete checkpoint ------------------------------------------
    ckpt_dir = out / "checkpoints"
    if accelerator.is_main_process and claim_checkpoints(ckpt_dir, config_hash(cfg, ignore=NOT_HASHED)):
        log.warning("removed checkpoints in %s written under another config", ckpt_dir)
    accelerator.wait_for_everyone()
    ckpt = latest_checkpoint(ckpt_dir) if cfg.train.resume else None
    tracking = Tracking(cfg.tracking, out, "ppo", to_dict(cfg), accelerator.is_main_process, fresh=ckpt is None)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        saved = json.loads((ckpt / "ppo_state.json").read_text())
        state.update(saved["state"])
        kl_ctl.load_state_dict(saved["kl_controller"])
        running.load_state_dict(saved["running_scores"])
        log.info("resumed from %s at step %d", ckpt, state["step"])
    elif eval_examples and accelerator.is_main_process:
        state["before"] = evaluate_directory(cfg.policy, cfg.reward_model, eval_examples, cfg)
        log.info("before PPO: %s", _summary(state["before"]))
    accelerator.wait_for_everyone()

    bar = tqdm(
        total=cfg.train.max_steps,
        initial=state["step"],
        desc="ppo",
        disable=not (accelerator.is_main_process and cfg.tracking.progress),
        dynamic_ncols=True,
    )
    model.train()
    while state["step"] < cfg.train.max_steps:
        step = state["step"]
        t0 = time.time()
        _set_lr(optimizer, step, cfg)
        batch_prompts = _prompt_batch(prompt_ids, step, B, accelerator, cfg.seed)

        # 1. generate (under ZeRO-3 the weights are gathered once for the whole rollout), keeping
        #    the sampled tokens' log-probs when they equal what a forward of the policy would give
        with torch.no_grad(), gathered_for_generation(model, accelerator) as unwrapped, accelerator.autocast():
            unwrapped.eval()
            query, response, sampled_logprobs = generate_ids(
                unwrapped.policy, tokenizer, [prompt_ids[i] for i in batch_prompts], gen, reuse_logprobs
            )
            unwrapped.train()
        R = response.shape[1]
        resp_mask, has_eos = response_mask(response, tokenizer.eos_token_id)  # (B, R), (B,)
        query_mask = (query != tokenizer.pad_token_id).long()
        # left pads are the only pads in a left-padded prompt; the pad id never appears inside one
        input_ids = torch.cat([query, response], dim=1)  # (B, P + R)
        attention_mask = torch.cat([query_mask, resp_mask], dim=1)  # (B, P + R)
        t_gen = time.time()

        # 2. log-probs under policy and reference; values (the math on them in fp32, whatever the
        #    models compute in)
        with torch.no_grad(), accelerator.autocast():
            logits, values = model(input_ids, attention_mask, R, with_logits=not reuse_logprobs)
            if reuse_logprobs:
                logprobs = sampled_logprobs.masked_fill(resp_mask == 0, 0.0)  # (B, R)
            else:
                logprobs = logprobs_from_logits(logits.float() / gen.temperature, response)  # (B, R)
            ref = reference_logits(accelerator.unwrap_model(model), ref_policy, input_ids, attention_mask, R)
            ref_logprobs = logprobs_from_logits(ref.float() / gen.temperature, response)  # (B, R)
            del logits, ref

        # 3. score: reward model at the response's last real token, rule rewards, EOS penalty
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        questions = [prompts[i]["prompt"][-1]["content"] for i in batch_prompts]
        with accelerator.autocast():
            rm_scores = reward_scores(reward_model, input_ids, attention_mask) if reward_model is not None else None
        rules = {name: torch.tensor(RULES[name](questions, texts), device=device) for name in cfg.reward.rules}
        raw_scores = combine_scores(rm_scores, rules, has_eos, cfg.reward)  # (B,)
        scores = normalize_scores(raw_scores, accelerator.gather(raw_scores), cfg.reward, running)
        t_score = time.time()

        # 4. KL-penalised per-token rewards;  5. GAE, whitened advantages
        kl = kl_estimate(logprobs, ref_logprobs, cfg.ppo.kl_estimator) * resp_mask  # (B, R)
        rewards = kl_penalized_rewards(scores, kl, kl_ctl.value, resp_mask)  # (B, R)
        advantages, returns = gae(rewards, values, resp_mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, resp_mask)
        _stop_if_not_finite(accelerator, step, scores=scores, rewards=rewards, advantages=advantages)
        rollout = Rollout(
            input_ids,
            attention_mask,
            response,
            resp_mask,
            logprobs,
            ref_logprobs,
            values,
            scores,
            rewards,
            advantages,
            returns,
        )

        # 6. PPO epochs over shuffled minibatches, each split into grad_accum micro-batches
        stats = _ppo_update(model, optimizer, accelerator, rollout, cfg, step)
        t_train = time.time()

        # 7. log, adapt β, checkpoint, evaluate
        seq_kl = accelerator.gather(kl.sum(1)).mean().item()
        kl_ctl.update(seq_kl, B * accelerator.num_processes)
        state["kl_history"] = (state["kl_history"] + [seq_kl])[-10:]
        state["step"] = step + 1
        n_tokens = accelerator.gather(resp_mask.sum()).sum().item()
        metrics = {
            "train/ppo/score": accelerator.gather(raw_scores).mean().item(),
            "train/ppo/reward": accelerator.gather(rewards.sum(1)).mean().item(),
            "train/ppo/kl": seq_kl,
            "train/ppo/kl_k3": accelerator.gather((kl_estimate(logprobs, ref_logprobs, "k3") * resp_mask).sum(1))
            .mean()
            .item(),
            "train/ppo/beta": kl_ctl.value,
            "train/ppo/response_length": accelerator.gather(resp_mask.sum(1).float()).mean().item(),
            "train/ppo/eos_rate": accelerator.gather(has_eos.float()).mean().item(),
            "train/ppo/explained_variance": explained_variance(values, returns, resp_mask),
            "train/ppo/value_mean": masked_mean(values, resp_mask).item(),
            "train/ppo/lr_policy": optimizer.param_groups[0]["lr"],
            "train/ppo/lr_value": optimizer.param_groups[1]["lr"],
            "train/ppo/time_generate_s": t_gen - t0,
            "train/ppo/time_score_s": t_score - t_gen,
            "train/ppo/time_train_s": t_train - t_score,
            "train/ppo/tokens_per_s": n_tokens / max(t_train - t0, 1e-9),
            "train/ppo/episodes_per_s": B * accelerator.num_processes / max(t_train - t0, 1e-9),
            **{f"train/ppo/{k}": v for k, v in stats.items()},
        }
        if rm_scores is not None:
            metrics["train/ppo/rm_score"] = accelerator.gather(rm_scores).mean().item()
        for name, values_ in rules.items():
            metrics[f"train/ppo/rule_{name}"] = accelerator.gather(values_).mean().item()
        if state["step"] % cfg.train.log_every == 0 or state["step"] == cfg.train.max_steps:
            tracking.log(metrics, step=state["step"])
        bar.set_postfix(score=f"{metrics['train/ppo/score']:.3f}", kl=f"{seq_kl:.3f}", beta=f"{kl_ctl.value:.3f}")
        bar.update(1)
        samples_every = cfg.tracking.samples_every or cfg.train.eval_every
        if samples_every and state["step"] % samples_every == 0:
            rows = [
                [q, t, round(s, 4), round(k, 4)]
                for q, t, s, k in zip(questions, texts, raw_scores.tolist(), kl.sum(1).tolist(), strict=False)
            ][:8]
            tracking.log_table("samples/ppo", ["prompt", "response", "score", "kl"], rows, step=state["step"])
        if cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0 and state["step"] < cfg.train.max_steps:
            tracking.log(
                _evaluate_in_loop(model, reward_model, accelerator, tokenizer, eval_examples, cfg), step=state["step"]
            )
        if cfg.train.save_every and state["step"] % cfg.train.save_every == 0:
            _save_checkpoint(accelerator, ckpt_dir, state, kl_ctl, running, cfg.train.keep_checkpoints)
    bar.close()

    # ---- the reference must not have moved; then save policy and value model -----------------
    ref_after = None if zero3 else fingerprint(reference, frozen_only=True)
    if ref_after != ref_fingerprint:
        raise RuntimeError(f"the frozen reference changed during PPO ({ref_fingerprint} -> {ref_after})")
    _save_models(accelerator, model, tokenizer, policy_source, out, cfg)
    metrics_out: dict = {
        "steps": state["step"],
        "final_kl": _mean(state["kl_history"]),
        "kl_target": cfg.ppo.kl_target,
        "beta": kl_ctl.value,
        "reference_fingerprint": ref_fingerprint,
    }
    if accelerator.is_main_process:
        if eval_examples:
            after = evaluate_directory(str(out), cfg.reward_model, eval_examples, cfg)
            report = {"before": state["before"], "after": after, **metrics_out, "eval_source": eval_source}
            if state["before"] and "accuracy" in after:
                report["accuracy_gain"] = round(after["accuracy"] - state["before"]["accuracy"], 4)
            atomic_write_json(out / "eval.json", report)
            tracking.log({f"eval/ppo/{k}": v for k, v in _flat(after).items()}, step=state["step"])
            metrics_out.update({"before": _summary(state["before"]), "after": _summary(after)})
            log.info("after PPO: %s (before: %s)", _summary(after), _summary(state["before"]))
        metrics_out["wall_time_s"] = round(time.time() - started, 1)
        write_manifest(
            out,
            stage="ppo",
            model=cfg.policy,
            base_model=policy_source.root,
            init_from=cfg.policy,
            config_hash=config_hash(cfg, ignore=NOT_HASHED),
            metrics=metrics_out,
            lora=cfg.lora.enabled,
            inputs=input_hashes(cfg.policy, cfg.reward_model, cfg.value_model),
            extra={"reward_model": cfg.reward_model, "data": {"train": train_source, "eval": eval_source}},
        )
    tracking.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics_out


def _ppo_update(model, optimizer, accelerator, rollout: Rollout, cfg: PPOStageConfig, step: int) -> dict:
    """Step 6: `ppo.epochs` passes over the rollout in `ppo.minibatches` shuffled minibatches; one
    optimizer step per minibatch (its micro-batches accumulate). Returns mean statistics."""
    B, R = rollout.response_ids.shape
    mb_size = B // cfg.ppo.minibatches
    micro = max(1, mb_size // cfg.train.grad_accum)
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    totals: dict[str, list[float]] = {}
    temperature = cfg.rollout.generation.temperature
    for _epoch in range(cfg.ppo.epochs):
        epoch_kl = []
        for order in torch.randperm(B, generator=generator).split(mb_size):
            for idx in order.split(micro):
                mb = rollout.select(idx.to(rollout.input_ids.device))
                with accelerator.accumulate(model):
                    logits, values = model(mb.input_ids, mb.attention_mask, R)
                    logits = logits.float() / temperature
                    new_logprobs = logprobs_from_logits(logits, mb.response_ids)
                    pg_loss, pg = policy_loss(
                        new_logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.ppo.clip_range
                    )
                    vf_loss, vf = value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.ppo.value_clip_range)
                    entropy = masked_mean(entropy_from_logits(logits), mb.response_mask)
                    loss = pg_loss + cfg.ppo.vf_coef * vf_loss - cfg.ppo.entropy_coef * entropy
                    _stop_if_not_finite(accelerator, step, loss=loss.detach())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        _clip(accelerator, model, cfg)
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in (
                    ("policy_loss", pg_loss),
                    ("value_loss", vf_loss),
                    ("entropy", entropy),
                    ("clipfrac", pg["clipfrac"]),
                    ("approx_kl", pg["approx_kl"]),
                    ("value_clipfrac", vf["clipfrac"]),
                    ("ratio", pg["ratio"]),
                ):
                    totals.setdefault(k, []).append(v.item())
                epoch_kl.append(pg["approx_kl"].item())
        totals.setdefault("epochs", []).append(1.0)
        mean_kl = accelerator.reduce(torch.tensor(_mean(epoch_kl), device=accelerator.device), "mean").item()
        if cfg.ppo.max_approx_kl is not None and mean_kl > cfg.ppo.max_approx_kl:
            break  # early stop: the policy moved too far from the one that sampled the rollout
    out = {k: _mean(v) for k, v in totals.items() if k != "epochs"}
    out["epochs_run"] = float(len(totals["epochs"]))
    return {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in out.items()}


def _logprobs_from_generation(cfg: PPOStageConfig, policy: torch.nn.Module, accelerator) -> bool:
    """Whether the rollout's log-probs come from the sampling pass (`rollout.logprobs_from_generation`;
    null: when they equal the training forward's up to fp32 rounding: fp32 weights and no mixed
    precision, which accelerate applies to the training forward, not to generate)."""
    if cfg.rollout.logprobs_from_generation is not None:
        return cfg.rollout.logprobs_from_generation
    return next(policy.parameters()).dtype == torch.float32 and accelerator.mixed_precision == "no"


def _clip(accelerator, model, cfg: PPOStageConfig) -> None:
    """Clip the policy's and the value model's gradients separately (each to its own max norm);
    under DeepSpeed the engine clips, as configured in its JSON."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return
    unwrapped = accelerator.unwrap_model(model)
    for module, optim in ((unwrapped.policy, cfg.optim), (unwrapped.value_model, cfg.value_optim)):
        if optim.max_grad_norm is not None:
            accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], optim.max_grad_norm)


def _param_group(module: torch.nn.Module, optim: OptimConfig) -> dict:
    return {
        "params": [p for p in module.parameters() if p.requires_grad],
        "lr": optim.lr,
        "initial_lr": optim.lr,
        "weight_decay": optim.weight_decay,
        "betas": optim.betas,
    }


def lr_factor(step: int, max_steps: int, optim: OptimConfig) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
    warmup = round(optim.warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if optim.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay


def _set_lr(optimizer, step: int, cfg: PPOStageConfig) -> None:
    """The policy's rate is 0 during the value warm-up: a freshly initialised value model gives
    noisy advantages, and early policy steps on noise are hard to undo."""
    for group, optim in zip(optimizer.param_groups, (cfg.optim, cfg.value_optim), strict=True):
        group["lr"] = optim.lr * lr_factor(step, cfg.train.max_steps, optim)
    if step < cfg.ppo.value_warmup_steps:
        optimizer.param_groups[0]["lr"] = 0.0


def _prompt_batch(prompt_ids: list, step: int, B: int, accelerator, seed: int) -> list[int]:
    """This process's prompt indices for `step`: a fixed seeded permutation per pass over the
    prompts, so the order is the same after a resume."""
    n = len(prompt_ids)
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


def _fill_deepspeed_config(accelerator, cfg: PPOStageConfig, hidden_size: int) -> None:
    """Fill the DeepSpeed config's "auto" entries that accelerate would read off a dataloader and
    a model config: PPO has no dataloader, and its module (policy + value) no single config."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    micro = max(1, cfg.rollout.prompts_per_step // cfg.ppo.minibatches // cfg.train.grad_accum)
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = micro * cfg.train.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else 0.0
    zero = ds.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value


def _save_checkpoint(accelerator, ckpt_dir: Path, state: dict, kl_ctl, running, keep: int) -> None:
    """Training state (weights, optimizer, RNG of every process, β, step) written aside as
    tmp-step-N, marked complete, then renamed to step-N: a crash never leaves a half-written
    checkpoint that looks finished."""
    final, tmp = ckpt_dir / f"step-{state['step']}", ckpt_dir / f"tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(
            tmp / "ppo_state.json",
            {"state": state, "kl_controller": kl_ctl.state_dict(), "running_scores": running.state_dict()},
        )
        mark_complete(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(ckpt_dir, keep)
    accelerator.wait_for_everyone()


def _save_models(accelerator, model, tokenizer, policy_source, out: Path, cfg: PPOStageConfig) -> None:
    """The policy as a full Hugging Face model directory in `out` (with LoRA: the adapter in
    out/adapter and the merged weights in out); the value model in out/value_model, or with
    `share_policy_trunk` its head alone in out/value_head.safetensors."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards on the main process
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    parts = {
        name: {k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(name + ".")}
        for name in ("policy", "value_model")
    }
    if cfg.lora.enabled:
        unwrapped.policy.save_pretrained(str(out / "adapter"), state_dict=parts["policy"])
        with whole_models():
            merged = build_policy(policy_source, cfg.model_init, tokenizer)
        from peft import PeftModel

        merged = PeftModel.from_pretrained(merged, str(out / "adapter")).merge_and_unload()
        merged.save_pretrained(str(out))
    else:
        unwrapped.policy.save_pretrained(str(out), state_dict=parts["policy"])
    unwrapped.policy.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if cfg.share_policy_trunk:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in parts["value_model"].items()}, str(out / "value_head.safetensors"))
    else:
        unwrapped.value_model.save_pretrained(str(out / "value_model"), state_dict=parts["value_model"])
        tokenizer.save_pretrained(str(out / "value_model"))


def evaluate_directory(
    policy_dir: str, reward_model_dir: str | None, examples: list[dict], cfg: PPOStageConfig
) -> dict:
    """Held-out accuracy (per digit bucket) of a saved policy, greedy, loaded as a user would,
    and the reward model's mean score of its answers. Main process only, plain models."""
    source = resolve(policy_dir)
    tokenizer = load_tokenizer(source, cfg.model_init)
    with whole_models():
        policy = build_policy(source, cfg.model_init, tokenizer).eval()
    metrics, samples = evaluate_generations(policy, tokenizer, examples, cfg.task.name, cfg.generation)
    if reward_model_dir:
        rm_source = resolve(reward_model_dir)
        with whole_models():
            reward_model = build_scalar_model(rm_source, cfg.model_init, load_tokenizer(rm_source, cfg.model_init))
        reward_model.eval()
        responses = generate_text(policy, tokenizer, [e["prompt"] for e in examples], cfg.generation)
        metrics["rm_score"] = round(_score_texts(reward_model, tokenizer, examples, responses), 4)
    return {**metrics, "samples": samples}


@torch.no_grad()
def _score_texts(reward_model, tokenizer, examples: list[dict], responses: list[str], batch: int = 256) -> float:
    """Mean reward-model score of responses to the examples' prompts."""
    device = next(reward_model.parameters()).device
    total = 0.0
    for s in range(0, len(examples), batch):
        prompt_ids = render_prompts(tokenizer, [e["prompt"] for e in examples[s : s + batch]])
        answers = tokenizer(responses[s : s + batch], add_special_tokens=False)["input_ids"]
        rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answers, strict=True)]
        ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
        total += reward_scores(reward_model, ids, mask).sum().item()
    return total / max(len(examples), 1)


def _evaluate_in_loop(model, reward_model, accelerator, tokenizer, examples: list[dict], cfg) -> dict:
    """Held-out accuracy during training, the prompts split across processes (every process
    takes part, as ZeRO-3 requires), results gathered on all."""
    with accelerator.split_between_processes(examples, apply_padding=True) as shard:
        with torch.no_grad(), gathered_for_generation(model, accelerator) as unwrapped:
            responses = generate_text(unwrapped.policy, tokenizer, [e["prompt"] for e in shard], cfg.generation)
        rm = _score_texts(reward_model, tokenizer, shard, responses) * len(shard) if reward_model is not None else 0.0
    rows = gather_object(
        [(e["prompt"][-1]["content"], e["completion"][-1]["content"], r) for e, r in zip(shard, responses, strict=True)]
    )[: len(examples)]
    rm_total = accelerator.reduce(torch.tensor(rm, device=accelerator.device), "sum").item()
    metrics = score_generations(
        cfg.task.name, [q for q, _, _ in rows], [a for _, a, _ in rows], [r for _, _, r in rows]
    )
    out = {f"eval/ppo/{k}": v for k, v in _flat(metrics).items()}
    if reward_model is not None:
        out["eval/ppo/rm_score"] = rm_total / max(len(shard) * accelerator.num_processes, 1)
    return out


@torch.no_grad()
def fingerprint(module: torch.nn.Module, frozen_only: bool = False) -> str:
    """A checksum of a module's weights (frozen ones only, if asked: with LoRA the reference is
    the policy's non-adapter weights), to prove the reference never moved."""
    total = torch.zeros(2, dtype=torch.float64)
    for _name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if frozen_only and p.requires_grad:
            continue
        data = p.detach().double().cpu()
        total += torch.stack([data.abs().sum(), (data * data).sum()])
    return f"{total[0].item():.10e}/{total[1].item():.10e}"


def _flat(metrics: dict) -> dict:
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat.update({f"accuracy_{d}": a for d, a in metrics.get("accuracy_by_digits", {}).items()})
    return flat


def _summary(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {k: v for k, v in metrics.items() if k in ("accuracy", "accuracy_by_digits", "rm_score")}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _check_same_tokenizer(policy_tok, rm_tok, rm_name: str) -> None:
    if policy_tok.get_vocab() != rm_tok.get_vocab():
        raise ConfigError(
            "reward_model",
            f"{rm_name} uses a different tokenizer than the policy; PPO scores the "
            "policy's tokens directly, so both must come from the same base model",
        )
