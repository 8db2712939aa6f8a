"""PPO's files: where a run resumes (or its "before" evaluation), atomic checkpoints of the training
state, the output models, and the end of the run (the held-out evaluation, eval.json, manifest)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peft import PeftModel
from safetensors.torch import save_file

from rlhf.checkpoint import atomic_write_json, finish_stage, mark_complete, prune_checkpoints
from rlhf.config import PPOStageConfig
from rlhf.distributed import wait_for_main, whole_models
from rlhf.evaluation import before_after_report, evaluate_directory, summary, tracked_metrics
from rlhf.registry import build_policy, merge_lora
from stages.ppo.run import LoopState, PPORun

log = logging.getLogger("rlhf.ppo")


def save_checkpoint(run: PPORun, state: LoopState) -> None:
    """Training state (weights, optimizer, RNG of every process, β, step) written aside as
    out/checkpoints/tmp-step-N, marked complete, then renamed to step-N: a crash never leaves a
    half-written checkpoint that looks finished."""
    accelerator, ckpt_dir = run.accelerator, run.out / "checkpoints"
    final, tmp = ckpt_dir / f"step-{state.step}", ckpt_dir / f"tmp-step-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(
            tmp / "ppo_state.json",
            {
                "state": state.to_dict(),
                "kl_controller": run.kl_ctl.state_dict(),
                "running_scores": run.running.state_dict(),
            },
        )
        mark_complete(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(ckpt_dir, run.cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_models(run: PPORun, out: Path) -> None:
    """The policy as a full Hugging Face model directory in `out` (run.out, or out/best.tmp; with
    LoRA: the adapter in out/adapter and the merged weights in out); the value model in
    out/value_model, or with `share_policy_trunk` its head alone in out/value_head.safetensors;
    nothing more without a critic."""
    accelerator, cfg, model, tokenizer = run.accelerator, run.cfg, run.models.model, run.models.tokenizer
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
            merged = build_policy(run.models.policy_source, cfg.model_init, tokenizer, precision=run.models.precision)
        merged = merge_lora(PeftModel.from_pretrained(merged, str(out / "adapter")))  # fp32: as trained
        merged.save_pretrained(str(out))
    else:
        unwrapped.policy.save_pretrained(str(out), state_dict=parts["policy"])
    unwrapped.policy.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if unwrapped.value_model is None:
        return
    if cfg.share_policy_trunk:
        save_file({k: v.contiguous() for k, v in parts["value_model"].items()}, str(out / "value_head.safetensors"))
    else:
        unwrapped.value_model.save_pretrained(str(out / "value_model"), state_dict=parts["value_model"])
        tokenizer.save_pretrained(str(out / "value_model"))


# train.keep_best: the held-out figure each choice reads, in-loop key and eval.json key
BEST_BY = {"gold": ("eval/ppo/gold_accuracy", "accuracy"), "proxy": ("eval/ppo/rm_score", "rm_score")}


def keep_if_best(run: PPORun, state: LoopState, evaluation: dict) -> None:
    """`train.keep_best`: after an in-loop evaluation, save the policy (and value model) to out/best
    when its figure beats every earlier one. Written as best.tmp and renamed, so out/best is
    always one whole model; state.best (checkpointed with the step) says which."""
    accelerator, cfg, out = run.accelerator, run.cfg, run.out
    value = evaluation.get(BEST_BY[cfg.train.keep_best][0])
    if value is None:
        return
    # to eval.json's 4 places, so that the last step's figure (rounded there) is compared like for like
    value, best = round(value, 4), state.best
    if best is not None and value <= best["value"]:
        return
    tmp = out / "best.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    save_models(run, tmp)
    if accelerator.is_main_process:
        shutil.rmtree(out / "best", ignore_errors=True)
        tmp.rename(out / "best")
    accelerator.wait_for_everyone()
    state.best = {"by": cfg.train.keep_best, "step": state.step, "value": value}


def restore_best(cfg: PPOStageConfig, state: LoopState, after: dict, out: Path) -> dict | None:
    """At the end (main process): if the kept evaluation beat the last step's (`after`), its
    model files replace the last step's in `out`. Returns what was kept, or None. out/best stays
    until the manifest is written (finish_run): removed here, a kill before the manifest left a
    rerun (resumed from the final checkpoint) without it, and keep_best silently did nothing."""
    best, best_dir = state.best, out / "best"
    final = after.get(BEST_BY[cfg.train.keep_best][1]) if cfg.train.keep_best else None
    kept = None
    if best is not None and final is not None and best["value"] > final and best_dir.is_dir():
        shutil.copytree(best_dir, out, dirs_exist_ok=True)
        kept = {**best, "last_step": state.step, "last_step_value": final}
        log.info(
            "keep_best=%s: the policy of step %d (%.4f) replaces the last step's (%.4f)",
            best["by"],
            best["step"],
            best["value"],
            final,
        )
    return kept


def resume_or_start(run: PPORun, ckpt: Path | None) -> LoopState:
    """The state of checkpoint `ckpt` (the newest complete one written under this config and these
    inputs, agreed by every process: rlhf/checkpoint.py `agreed_checkpoint`) with the weights,
    optimizer, RNG, β and running moments it holds loaded into `run`; or, with None, a fresh one
    with the held-out evaluation of the starting policy ("before", every test answer kept for
    `changed_items`)."""
    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    state = LoopState()
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        saved = json.loads((ckpt / "ppo_state.json").read_text())
        state = LoopState.from_dict(saved["state"])
        run.kl_ctl.load_state_dict(saved["kl_controller"])
        run.running.load_state_dict(saved["running_scores"])
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif (data.eval_examples or data.test_examples) and accelerator.is_main_process:
        state.before = evaluate_saved(run, cfg.policy) or None
        log.info("before PPO: %s", summary(state.before))
    wait_for_main()
    return state


def finish_run(run: PPORun, state: LoopState) -> dict:
    """Evaluate the saved policy on both held-out splits (main process), then eval.json (quoting the
    test split, with the test items PPO fixed and broke) and the manifest."""
    cfg, data, out = run.cfg, run.data, run.out
    metrics: dict = {
        "steps": state.step,
        "final_kl": mean_or_nan(state.kl_history),
        "kl_target": cfg.ppo.kl_target,
        "beta": run.kl_ctl.value,
        "reference_fingerprint": run.ref_fingerprint,
    }
    if not run.accelerator.is_main_process:
        return metrics
    report = None
    if data.eval_examples or data.test_examples:
        before, after = state.before, evaluate_saved(run, str(out), keep=True)
        run.tracking.log(_last_point(after), step=state.step)
        kept = restore_best(cfg, state, _validation(after), out)
        if kept:  # the output is now an earlier evaluation's policy: eval.json describes that one
            after = evaluate_saved(run, str(out), keep=True)
            metrics["kept"] = kept
        report = before_after_report(before, after, data.eval_source, data.test_source, **metrics)
        metrics.update({"before": summary(before), "after": summary(after)})
        log.info("after PPO: %s (before: %s)", summary(after), summary(state.before))
    finish_stage(
        out,
        cfg,
        stage="ppo",
        model=cfg.policy,
        base_model=run.models.policy_source.root,
        inputs=(cfg.policy, cfg.reward_model, cfg.value_model, cfg.reference),
        metrics=metrics,
        started=run.started,
        eval_report=report,
        extra={
            "reward_model": cfg.reward_model,
            "data": {"train": data.train_source, "eval": data.eval_source, "test": data.test_source},
        },
    )
    shutil.rmtree(out / "best", ignore_errors=True)  # the manifest says what was kept; the copy has served
    return metrics


def _validation(evaluation: dict) -> dict:
    """The validation split's figures of an evaluation (the test split's sit at the top level)."""
    return evaluation.get("validation", {}) if evaluation.get("split") == "test" else evaluation


def _last_point(after: dict) -> dict:
    """The last step's policy as tracked numbers: the in-loop curves' last point (validation, with
    its gold accuracy, train.keep_best's figure) and the test split under test/ppo/."""
    last = tracked_metrics(after, "ppo")
    if "accuracy" in _validation(after):
        last["eval/ppo/gold_accuracy"] = _validation(after)["accuracy"]
    return last


def evaluate_saved(run: PPORun, policy_dir: str, keep: bool = False) -> dict:
    """Both held-out splits' evaluation of the policy saved in `policy_dir` (the run's config's
    reward model and generation settings, in fp32 like every stage's eval.json); `keep`: its
    answers kept for a later stage (this run's output; rlhf/evaluation.py `AnswerMemo`)."""
    cfg = run.cfg
    return evaluate_directory(
        policy_dir,
        cfg.scalar_reward_model,  # its mean score of the answers (eval/ppo/rm_score); an implicit reward has none
        run.data.held_out(),
        cfg.task.name,
        cfg.generation,
        cfg.model_init,
        run.models.precision,
        seed=cfg.seed,
        keep=keep,
    )


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
