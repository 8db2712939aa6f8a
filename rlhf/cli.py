"""The command line shared by the stage launchers:

    launch/stage1_sft.py [--config FILE] [key.sub=value ...] [--print-config]
    rlhf sft [--config FILE] [key.sub=value ...] [--print-config]     (installed: stages/commands.py)

Without --config a stage runs the generic defaults (the dataclasses in rlhf/config: no task, your
data, settings for a pretrained model), never the tiny recipe's (configs/tiny/*.yaml).

Bad configs, bad data, unloadable models and broken reward functions end the process with one line
on stderr naming the key, file, line, field or function, and exit code 2. A run stopped mid-way
with its weights intact (a NaN/inf, a reward server that stopped answering) exits with code 3:
its last checkpoint resumes.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable

import torch

from rlhf.checkpoint import ManifestError, OutputInUseError, check_output_free, release_output_locks
from rlhf.config import ConfigError, dump_yaml, load_config
from rlhf.data import DataError
from rlhf.distributed import zero3_launched
from rlhf.hub import HubError, check_hub, push_output
from rlhf.registry import ModelLoadError
from rlhf.reward_client import RemoteRewardError, ServedModelChanged
from rlhf.reward_functions import RewardFunctionError
from rlhf.tracking import finish_open_trackers

USER_ERRORS = (
    ConfigError,
    DataError,
    ModelLoadError,
    ManifestError,
    OutputInUseError,
    RewardFunctionError,
    HubError,
    ServedModelChanged,  # a reward server restarted with another model than the run's checkpoints were scored by
)


def parse(cls: type, default_config: str | None, argv: list[str] | None = None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    default_help = default_config or "none: the generic defaults of rlhf/config, no task"
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_help})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides)
    return cfg, args.print_config


def run_stage(cls: type, train: Callable, default_config: str | None, argv: list[str] | None = None) -> int:
    """Parse, run `train(cfg)`, and turn user errors into a one-line message and exit code 2
    (3 for a NaN/inf). Whatever happens, the trackers, the output lock and the process group are
    ended here: a process that exits with its process group alive can abort in the collective
    library's teardown (`terminate called without an active exception` under ZeRO-3)."""
    setup_logging()
    setup_cpu_threads()
    if zero3_launched():
        return_freed_memory()
    try:
        code = _run(cls, train, default_config, argv)
    finally:
        teardown()
    # `accelerate launch` reports any failure as exit code 1; the pipeline reads the real one here.
    status_file = os.environ.get("RLHF_EXIT_STATUS_FILE")
    if status_file and code != 0 and os.environ.get("RANK", "0") == "0":
        with open(status_file, "w") as f:
            f.write(f"{code}\n")
    return code


def _run(cls: type, train: Callable, default_config: str | None, argv: list[str] | None) -> int:
    try:
        cfg, print_only = parse(cls, default_config, argv, description=(train.__doc__ or "").strip())
        if print_only:
            print(dump_yaml(cfg), end="")
            return 0
        hub = getattr(cfg, "hub", None)  # a stage that writes a model can push it (hub.push_to_hub)
        if hub is not None:
            check_hub(hub)  # an unreachable hub is refused now, not after training
        main = os.environ.get("RANK", "0") == "0"
        if main:
            check_output_free(cfg.output_dir)  # a second run on one directory stops at once
        train(cfg)
        if hub is not None and hub.push_to_hub and main:
            url = push_output(cfg.output_dir, hub, stage=type(cfg).__name__.removesuffix("StageConfig").lower())
            logging.getLogger("rlhf").info("pushed %s to %s", cfg.output_dir, url)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FloatingPointError, RemoteRewardError) as e:  # a NaN/inf, or a dead reward server, caught mid-run
        # before the step reached the weights: the last checkpoint resumes
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 3
    return 0


def _one_line(error: Exception) -> str:
    """The message on one line: some wrap a library's multi-line one (the hub's, for a model)."""
    return " ".join(str(error).split())


def teardown() -> None:
    finish_open_trackers()
    release_output_locks()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def setup_cpu_threads() -> None:
    """On a CPU-only machine, use every core (shared among local processes). `accelerate launch`
    sets OMP_NUM_THREADS=1 unless told otherwise, which runs a CPU job on one core; RLHF_NUM_THREADS
    overrides the choice."""
    if torch.cuda.is_available():
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(os.environ.get("RLHF_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local_procs)
    torch.set_num_threads(threads)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Give every host allocation of `threshold` bytes or more its own mapping, which goes back to
    the OS when it is freed. glibc's default raises this threshold to the size of each large block
    freed (up to 32 MiB), so the weight-sized buffers that ZeRO-3 gathers and frees over and over
    (3.2 to 17 MB each at Qwen2.5-0.5B's shape) land in the heap and leave holes the process keeps:
    a two-process ZeRO-3 PPO run at that shape grew past 12 GB a process and was killed for memory
    (docs/benchmarks.md, "Real-shape smoke run"). Smaller allocations are unaffected. It has a cost
    (every large block is a fresh mapping, faulted in page by page: a forward and backward of that
    shape in one process took 30 % longer), so stages set it under ZeRO-3 only.
    Linux with glibc only; a MALLOC_MMAP_THRESHOLD_ set in the environment is left to rule.
    Returns whether the setting was made."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
