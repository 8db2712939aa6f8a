"""PPO's files: resumable training state (atomic checkpoints) and the stage's output models."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftModel
from safetensors.torch import save_file

from rlhf.checkpoint import atomic_write_json, mark_complete, prune_checkpoints
from rlhf.config import PPOStageConfig
from rlhf.distributed import whole_models
from rlhf.precision import Precision
from rlhf.registry import ModelSource, build_policy


def save_checkpoint(accelerator, ckpt_dir: Path, state: dict, kl_ctl, running, keep: int) -> None:
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


def save_models(
    accelerator, model, tokenizer, policy_source: ModelSource, out: Path, cfg: PPOStageConfig, precision: Precision
) -> None:
    """The policy as a full Hugging Face model directory in `out` (with LoRA: the adapter in
    out/adapter and the merged weights in out); the value model in out/value_model, or with
    `share_policy_trunk` its head alone in out/value_head.safetensors; nothing more without a
    critic."""
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
            merged = build_policy(policy_source, cfg.model_init, tokenizer, precision=precision)
        merged = PeftModel.from_pretrained(merged, str(out / "adapter")).merge_and_unload()
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
