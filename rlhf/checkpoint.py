"""Stage outputs and training state on disk: atomic writes, the manifest, resumable checkpoints.

Every stage's output directory is a standard Hugging Face model directory plus `manifest.json`:

    {"stage": "sft", "model": "tiny", "base_model": "tiny", "init_from": null,
     "config_hash": "…", "metrics": {…}, "versions": {…}, "lora": false, "finished": true}

`manifest.json` is written last, so a directory with a finished manifest holds a whole model.
Resumable training state lives in `<output_dir>/checkpoints/`; a checkpoint counts only once its
`COMPLETE` marker exists, so one cut short by a crash or `kill -9` is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rlhf.config import NOT_HASHED, config_hash, dump_yaml

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
_STEP = re.compile(r"^(?:checkpoint|step)-(\d+)$")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write aside, fsync, then rename over the target: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("rlhf-pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_manifest(
    output_dir: str | Path,
    *,
    stage: str,
    model: str,
    base_model: str,
    init_from: str | None,
    config_hash: str,
    metrics: dict,
    lora: bool,
    inputs: dict[str, str | None] | None = None,
    extra: dict | None = None,
) -> dict:
    """`inputs` maps each earlier stage output this stage read (model, policy, reward model) to
    that output's config hash, so a pipeline can tell when an upstream stage changed."""
    manifest = {
        "stage": stage,
        "model": model,
        "base_model": base_model,
        "init_from": init_from,
        "config_hash": config_hash,
        "metrics": metrics,
        "lora": lora,
        "inputs": inputs or {},
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": True,
        **(extra or {}),
    }
    atomic_write_json(Path(output_dir) / MANIFEST, manifest)
    return manifest


def start_stage(output_dir: str | Path, cfg, is_main_process: bool) -> Path:
    """A stage's start: the output directory exists, its old manifest is gone (the directory is
    being rewritten, so it no longer counts as finished) and the resolved config is written.
    Returns the directory."""
    out = Path(output_dir)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return out


def finish_stage(
    output_dir: str | Path,
    cfg,
    *,
    stage: str,
    model: str,
    base_model: str,
    inputs: tuple[str | None, ...],
    metrics: dict,
    started: float,
    eval_report: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """A stage's end, on the main process: eval.json (if there is a held-out report), then the
    manifest, written last so that its presence means the directory is complete. `model` is the
    stage's input model as configured; it is recorded as `init_from` when it is an earlier
    stage's output. `inputs` are the earlier stage outputs it read (their config hashes are
    recorded so a pipeline can tell when one changed)."""
    out = Path(output_dir)
    from_stage = Path(model).is_dir() and read_manifest(model) is not None
    if eval_report is not None:
        atomic_write_json(out / "eval.json", eval_report)
    metrics["wall_time_s"] = round(time.time() - started, 1)
    return write_manifest(
        out,
        stage=stage,
        model=model,
        base_model=base_model,
        init_from=model if from_stage else None,
        config_hash=config_hash(cfg, ignore=NOT_HASHED),
        metrics=metrics,
        lora=cfg.lora.enabled,
        inputs=input_hashes(*inputs),
        extra=extra,
    )


def input_hashes(*paths: str | None) -> dict[str, str | None]:
    """{path: config_hash} for the given model paths that are stage outputs with a manifest."""
    out = {}
    for p in paths:
        if p and Path(p).is_dir():
            manifest = read_manifest(p)
            if manifest:
                out[str(p)] = manifest.get("config_hash")
    return out


def claim_checkpoints(checkpoint_dir: str | Path, digest: str) -> bool:
    """Tie a checkpoint directory to a config hash. Checkpoints written under another config
    are removed (resuming from them would mix two runs); returns True if any were removed.
    Call on the main process only."""
    checkpoint_dir = Path(checkpoint_dir)
    stamp = checkpoint_dir / "CONFIG_HASH"
    removed = False
    if stamp.is_file() and stamp.read_text().strip() != digest:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        removed = True
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write_text(stamp, digest + "\n")
    return removed


def mark_complete(checkpoint_dir: str | Path) -> None:
    atomic_write_text(Path(checkpoint_dir) / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))


def checkpoint_step(path: str | Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint (`checkpoint-N` or `step-N` with a COMPLETE marker)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if checkpoint_step(p) is not None and (p / COMPLETE).is_file()]
    return max(done, key=checkpoint_step, default=None)


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete ones older than
    the newest complete one (left by a crash)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    steps = sorted((p for p in directory.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
    complete = [p for p in steps if (p / COMPLETE).is_file()]
    newest = checkpoint_step(complete[-1]) if complete else -1
    for p in steps:
        stale = p not in complete and checkpoint_step(p) < newest
        if stale or (p in complete and p not in complete[-keep:]):
            shutil.rmtree(p, ignore_errors=True)
