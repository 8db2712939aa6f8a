"""The process group of a stage, on GPUs or on a CPU-only machine.

accelerate only picks a CPU process group (gloo) when told the job is on CPU: launched with a
multi-GPU or DeepSpeed config on a machine without GPUs, every process would otherwise believe it
runs alone. `process_state()` makes that choice before any Trainer or Accelerator exists, and
they all share it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

log = logging.getLogger("rlhf")


def process_state() -> PartialState:
    """The stage's PartialState. Collectives time out after RLHF_PG_TIMEOUT_S seconds (default
    1800, NCCL's and gloo's own default, set explicitly so that it is known and can be lowered):
    a process left waiting for a peer that died fails instead of hanging."""
    timeout = timedelta(seconds=float(os.environ.get("RLHF_PG_TIMEOUT_S", "1800")))
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        state = PartialState(timeout=timeout)
    elif deepspeed_launched():
        state = PartialState(backend="gloo", timeout=timeout)  # DeepSpeed's CPU accelerator over gloo
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by AcceleratorState and TrainingArguments
        state = PartialState(cpu=True, timeout=timeout)
    _main_wait_group()  # here, where every process is at the same point: making a group is collective
    return state


_MAIN_WAIT: list = []  # the process group of wait_for_main, made once per process


def _main_wait_group():
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if not _MAIN_WAIT:
        timeout = timedelta(seconds=float(os.environ.get("RLHF_MAIN_WAIT_TIMEOUT_S", str(7 * 24 * 3600))))
        _MAIN_WAIT.append(dist.new_group(backend="gloo", timeout=timeout))
    return _MAIN_WAIT[0]


def wait_for_main() -> None:
    """Wait, on every process, for work the main process does alone (a held-out evaluation,
    labelling, the output's last files), however long it takes. A plain barrier gives up after the
    process group's timeout (RLHF_PG_TIMEOUT_S): an evaluation longer than that aborted the other
    ranks after training had finished. This barrier runs in a gloo group of its own, whose timeout
    is RLHF_MAIN_WAIT_TIMEOUT_S (a week unless set); a main process that dies still ends the
    others, as the launcher stops every process when one fails."""
    group = _main_wait_group()
    if group is not None:
        torch.distributed.barrier(group=group)


def deepspeed_launched() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed: the only way to know before an Accelerator
    exists (precision is resolved then). Read as accelerate itself reads it."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def zero3_launched() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed ZeRO-3, before any Accelerator exists: the
    stage in ACCELERATE_DEEPSPEED_ZERO_STAGE, else in the JSON config file accelerate passes on."""
    if not deepspeed_launched():
        return False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if stage.isdigit():
        return int(stage) == 3
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    try:
        with open(config_file) as f:
            return json.load(f).get("zero_optimization", {}).get("stage") == 3
    except (OSError, ValueError):
        return False  # no readable file: DeepSpeed itself will say what is wrong with it


def deepspeed_plugin(accelerator):
    """The accelerator's DeepSpeed plugin (its JSON config, ZeRO stage), or None without DeepSpeed:
    the one "is this DeepSpeed" check once an Accelerator exists."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def is_zero3(accelerator) -> bool:
    """Whether the accelerator runs DeepSpeed ZeRO-3 (parameters sharded across processes)."""
    plugin = deepspeed_plugin(accelerator)
    return plugin is not None and plugin.zero_stage == 3


def largest_layers(model: torch.nn.Module) -> tuple[int, int]:
    """(block, module): the parameter count of the largest element of any ModuleList in `model`
    with all it holds (a decoder layer), and the largest module's own parameters (what DeepSpeed's
    memory estimator calls the largest layer: an embedding, an MLP projection). A partitioned
    parameter counts whole (`ds_numel`)."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    own = [sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()]
    blocks = [
        sum(numel(p) for p in block.parameters())
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList)
        for block in m
    ]
    return max([*blocks, 0]), max([*own, 0])


def zero3_live_sizes(block: int, module: int) -> dict[str, int]:
    """ZeRO-3's gathering limits from `largest_layers`. DeepSpeed's defaults are 1e9; the 1e8 these
    configs held (sized for a 0.5B model on a CPU) is below one 7B decoder layer (~2e8), which
    turns prefetching off on a GPU. Live: two blocks (the one computing and the next prefetched),
    and never less than the largest single module with a block beside it (an embedding is gathered
    whole). Reuse distance: one block, which spans a checkpointed block's recompute and its backward,
    so its weights are not gathered twice. Without blocks the largest module stands for one."""
    block = block or module
    return {
        "stage3_max_live_parameters": max(2 * block, module + block),
        "stage3_max_reuse_distance": block,
    }


def fill_zero3_sizes(ds_config: dict, model: torch.nn.Module) -> None:
    """Replace the "auto" of `zero3_live_sizes`' keys in a DeepSpeed config (in place) with sizes
    from `model`: accelerate and transformers fill the "auto" of keys sized by the hidden size, not
    of these. A number in the JSON is kept."""
    zero = ds_config.get("zero_optimization", {})
    wanted = [k for k in zero3_live_sizes(1, 1) if zero.get(k) == "auto"]
    if wanted:
        sizes = zero3_live_sizes(*largest_layers(model))
        zero.update({k: sizes[k] for k in wanted})
        log.info("ZeRO-3 sizes from the model: %s", {k: sizes[k] for k in wanted})


@contextlib.contextmanager
def whole_models():
    """Models built inside this block are whole on this process. Under DeepSpeed ZeRO-3,
    transformers otherwise builds every model partitioned across processes (zero.Init), which
    needs all of them: a main-process-only evaluation of the saved model would wait forever."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    if ref is None or ref() is None or not ref().is_zero3():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(ref())
