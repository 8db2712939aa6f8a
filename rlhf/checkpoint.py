"""Stage outputs and training state on disk: atomic writes, the manifest, resumable checkpoints.

Every stage's output directory is a standard Hugging Face model directory plus `manifest.json`:

    {"stage": "sft", "model": "tiny", "base_model": "tiny", "init_from": null,
     "config_hash": "…", "metrics": {…}, "versions": {…}, "lora": false, "finished": true}

`manifest.json` is written last, so a directory with a finished manifest holds a whole model.
Resumable training state lives in `<output_dir>/checkpoints/`; a checkpoint counts only once its
`COMPLETE` marker exists, so one cut short by a crash or `kill -9` is never picked up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list, gather_object

from rlhf.config import NOT_HASHED, WEIGHTS_NEUTRAL, ConfigError, config_hash, dump_yaml
from rlhf.model_card import launch_command, model_card

# The stages whose outputs a run directory holds (runs/<name>/<stage>/), in pipeline order: the
# kinds a pipeline's `stages` may list (rlhf/pipeline.py) and the stages its report reads (rlhf/report.py).
STAGES = ("sft", "rm", "ppo", "dpo")

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
_STEP = re.compile(r"^(?:checkpoint|step)-(\d+)$")
LOCK = ".lock"


class ManifestError(ValueError):
    """A manifest.json that cannot be read: one line naming the file."""


class OutputInUseError(RuntimeError):
    """Another run holds the output directory's lock."""


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
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable manifest ({e}); re-run the stage that wrote it") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a readable manifest (a JSON object expected); re-run the stage that wrote it")
    return manifest


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


def start_stage(output_dir: str | Path, cfg, is_main_process: bool, every_process: bool = True) -> Path:
    """A stage's start, called once its config, data and models have loaded (a bad input must
    leave an earlier output untouched): the output directory exists and is locked for this run,
    its old manifest is gone (the directory is being rewritten, so it no longer counts as
    finished) and the resolved config is written. Returns the directory. Called on every process
    (`every_process`; the label stage calls it on the main process alone), which first checks that
    all of them see one directory."""
    out = Path(output_dir)
    if every_process:
        check_one_disk(out, is_main_process)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        lock_output(out)
        (out / MANIFEST).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return out


def check_one_disk(out: Path, is_main_process: bool) -> None:
    """Refuse, on every process and before anything is changed, an output directory that is not
    one directory for all of them (nodes without a shared disk): checkpoints are renamed, pruned
    and marked complete by global rank 0 alone, so another node's copy lagged (its temporary
    folders growing) and a resume there read another step's state, or none."""
    probe: list[str | None] = [None]
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        probe = [f".shared-{os.getpid()}-{time.time_ns()}"]
        (out / probe[0]).touch()
    broadcast_object_list(probe)
    everyone = gather_object([(out / probe[0]).is_file()])  # every process has looked once this returns
    if is_main_process:
        (out / probe[0]).unlink(missing_ok=True)
    blind = [rank for rank, seen in enumerate(everyone) if not seen]
    if blind:
        raise ConfigError(
            "output_dir",
            f"{out} is not one directory for every process: rank {blind[0]} does not see the files rank 0 "
            "writes there (nodes without a shared disk); put output_dir on a disk all nodes share",
        )


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
    """A stage's end, on the main process: eval.json (if there is a held-out report), the model
    card (README.md, rlhf/model_card.py), then the manifest, written last so that its presence
    means the directory is complete. `model` is the stage's input model as configured; it is
    recorded as `init_from` when it is an earlier stage's output. `inputs` are the earlier stage
    outputs it read (their config hashes are recorded so a pipeline can tell when one changed)."""
    out = Path(output_dir)
    from_stage = Path(model).is_dir() and read_manifest(model) is not None
    if eval_report is not None:
        atomic_write_json(out / "eval.json", eval_report)
    metrics["wall_time_s"] = round(time.time() - started, 1)
    digest = content_hash(cfg)  # one value in the card and the manifest
    if stage != "label":  # every stage but the labelling one writes a model: its card, README.md
        card = model_card(
            stage=stage,
            model=model,
            base_model=base_model,
            metrics=metrics,
            eval_report=eval_report,
            data=(extra or {}).get("data"),
            command=launch_command(),
            config_hash=digest,
        )
        atomic_write_text(out / "README.md", card)
    return write_manifest(
        out,
        stage=stage,
        model=model,
        base_model=base_model,
        init_from=model if from_stage else None,
        config_hash=digest,
        metrics=metrics,
        lora=cfg.lora.enabled if hasattr(cfg, "lora") else False,  # a labelling stage trains nothing
        inputs=input_hashes(*inputs),
        extra=extra,
    )


def content_hash(cfg, ignore: tuple[str, ...] = NOT_HASHED) -> str:
    """What a stage's output is made from, as a short hash (manifest.json's `config_hash`; the
    pipeline skips a stage whose finished output has the hash its config gives now): the config
    less `ignore`, with every value that names a local file or directory replaced by what it
    holds (`path_identity`). A data file whose lines changed, or an earlier stage re-trained with
    the same config, changes it; how a path is spelled (relative, absolute, from another
    directory) does not."""
    return config_hash(cfg, ignore=ignore, leaf=path_identity)


def path_identity(value: str) -> str:
    """A config string as what it names: an earlier stage's finished output by the digest of its
    manifest (a re-run writes a new one: new finished_at and metrics), a file or another
    directory (a dataset or model directory) by the digest of its bytes; anything else (a preset,
    a hub id, a name) as written. An unfinished stage output (no manifest yet) by its full path:
    it matches nothing a finished run recorded."""
    try:
        path = Path(value)
        if not value.strip() or "\n" in value or not path.exists():
            return value
    except (OSError, ValueError):  # not a possible path (too long, a NUL)
        return value
    if path.is_file():
        return "file:" + _file_digest(path)
    if (path / MANIFEST).is_file():
        return "stage:" + _file_digest(path / MANIFEST)
    if (path / LOCK).exists() or (path / "checkpoints").exists():
        return "unfinished:" + str(path.resolve())
    return "dir:" + _tree_digest(path, lambda rel: True).hexdigest()[:16]


# What a stage writes beside the model files (reports, logs, training state): none of it changes
# what the model answers, so `model_files_digest` leaves it out.
NOT_MODEL_FILES = (MANIFEST, LOCK, "eval.json", "README.md", "metrics.jsonl", "config.yaml", "training_args.bin")
NOT_MODEL_DIRS = ("checkpoints", "evaluations", "tensorboard", "wandb", "logs", "best", "best.tmp")


def model_files_digest(path: str | Path) -> str:
    """The identity of the model a saved directory holds: the digest of the bytes of its model
    files (weights, configs, tokenizer, chat template; NOT_MODEL_FILES / NOT_MODEL_DIRS left out)
    and, for a LoRA adapter, of the base model its adapter_config.json names (`path_identity`).
    Two directories answer alike when their digests agree, however they were written or named."""
    path = Path(path)
    digest = _tree_digest(path, _is_model_file)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        digest.update(f"base\0{path_identity(base)}\0".encode())
    return digest.hexdigest()[:16]


def _is_model_file(rel: Path) -> bool:
    return rel.parts[0] not in NOT_MODEL_DIRS and not (len(rel.parts) == 1 and rel.name in NOT_MODEL_FILES)


def _tree_digest(path: Path, include):
    """sha256 over the relative path and bytes of every file under `path` that `include(rel)` accepts."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if include(rel):
            digest.update(f"{rel.as_posix()}\0{_file_digest(f)}\0".encode())
    return digest


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def checkpoint_digest(cfg, inputs: tuple[str | None, ...] = ()) -> str:
    """What a resumable checkpoint belongs to: the config, less the keys that cannot change the
    trained weights (WEIGHTS_NEUTRAL: logging, saving, evaluation), by content (`content_hash`:
    the data files' bytes and each earlier stage output's manifest). An upstream stage that
    re-ran makes earlier checkpoints stale, though this stage's own config is unchanged; the same
    run addressed by another spelling of its paths resumes. (`inputs`: the earlier outputs it
    reads, all named in the config and so covered.)"""
    ignore = NOT_HASHED + WEIGHTS_NEUTRAL
    gen = getattr(cfg, "generation", None)
    if gen is not None and gen.do_sample:  # a sampled evaluation draws from the training RNG
        ignore = tuple(k for k in ignore if k not in ("generation", "train.eval_every"))
    return content_hash(cfg, ignore)


def input_hashes(*paths: str | None) -> dict[str, str | None]:
    """{path: config_hash} for the given model paths that are stage outputs with a manifest."""
    out = {}
    for p in paths:
        if p and Path(p).is_dir():
            manifest = read_manifest(p)
            if manifest:
                out[str(p)] = manifest.get("config_hash")
    return out


def claim_checkpoints(checkpoint_dir: str | Path, digest: str) -> Path | None:
    """Tie a checkpoint directory to a `checkpoint_digest`. Checkpoints written under another
    digest (another config, or other inputs) are never resumed from: the directory is moved
    aside to checkpoints.stale-<their digest>-<time>, kept for the user to inspect or delete.
    Returns where it went, or None. Call on the main process only."""
    checkpoint_dir = Path(checkpoint_dir)
    stamp = checkpoint_dir / "CONFIG_HASH"
    moved = None
    if stamp.is_file() and (old := stamp.read_text().strip()) != digest:
        moved = move_aside(checkpoint_dir, f"stale-{old}")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write_text(stamp, digest + "\n")
    return moved


def move_aside(path: str | Path, why: str) -> Path | None:
    """Rename `path` to <path>.<why>-<time> beside it, kept for the user to inspect or delete;
    checkpoints are never deleted on a guess. Returns the new path, or None if there was nothing."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.{why}-{stamp}"), 1
    while target.exists():  # two moves in one second
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    path.rename(target)
    return target


def agreed_checkpoint(checkpoint_dir: str | Path, digest: str, resume: bool, is_main_process: bool) -> Path | None:
    """The checkpoint every process resumes from, decided on the main process and broadcast: on
    several nodes without one view of the disk, each deciding for itself would split the run
    (ranks at different steps). The main process first moves checkpoints of another digest (or,
    with resume false, any) aside and removes ones a crash cut short (no COMPLETE marker). Call on
    every process."""
    checkpoint_dir = Path(checkpoint_dir)
    choice: list[str | None] = [None]
    if is_main_process:
        if not resume and latest_checkpoint(checkpoint_dir) is not None:
            # train.resume=false: the old run's checkpoints go aside. Left among the new ones, they
            # would outnumber them in pruning (the highest steps are kept, so each new checkpoint
            # was deleted as soon as written) and a crash would resume the old run.
            moved = move_aside(checkpoint_dir, "not-resumed")
            logging.getLogger("rlhf").warning("train.resume=false: earlier checkpoints moved aside to %s", moved)
        moved = claim_checkpoints(checkpoint_dir, digest)
        if moved is not None:
            logging.getLogger("rlhf").warning("checkpoints of another config or input moved aside to %s", moved)
        for p in checkpoint_dir.iterdir():
            if p.is_dir() and checkpoint_step(p) is not None and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
        newest = latest_checkpoint(checkpoint_dir) if resume else None
        choice = [str(newest) if newest else None]
    broadcast_object_list(choice)  # also the barrier after the main process's clean-up
    return Path(choice[0]) if choice[0] else None


def lock_output(output_dir: Path) -> None:
    """Hold <output_dir>/.lock for the rest of this process (flock; the kernel drops it when the
    process ends, crash included): a second run on the same directory would interleave and
    prune the first one's checkpoints. The file names the holder for the error message."""
    path = Path(output_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _in_use(output_dir, fd)
        os.close(fd)
        raise error from None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
    _HELD_LOCKS.append(fd)


def check_output_free(output_dir: str | Path) -> None:
    """Stop at once if another run holds `output_dir`'s lock, without creating or changing
    anything (the lock itself is taken when training starts, in `start_stage`)."""
    path = Path(output_dir) / LOCK
    if not path.is_file() or _HELD_LOCKS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(output_dir, fd) from None
    finally:
        os.close(fd)


def _in_use(output_dir: str | Path, fd: int) -> OutputInUseError:
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
    return OutputInUseError(f"{output_dir} is in use by another run ({holder}); wait for it or use another output_dir")


def release_output_locks() -> None:
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


_HELD_LOCKS: list[int] = []  # file descriptors of the output locks this process holds


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
