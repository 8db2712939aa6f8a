"""Freed host memory goes back to the OS (rlhf/cli.py `return_freed_memory`, called by every stage
launched with DeepSpeed ZeRO-3):
without it, layer-sized buffers gathered and freed over and over under ZeRO-3 leave holes in the
heap that the process keeps, and a two-process PPO at Qwen2.5-0.5B's shape was killed for memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import return_freed_memory
from rlhf.distributed import zero3_launched

ROOT = Path(__file__).resolve().parents[1]

# 40 weight-sized blocks (17 MB, an MLP matrix of Qwen2.5-0.5B in fp32) with small live blocks
# between them, as gathered parameters are between activations; then the large ones are freed.
# One large block allocated and freed first: glibc then raises its mmap threshold to that size.
SCRIPT = """
import sys
import torch
from rlhf.cli import return_freed_memory

if sys.argv[1] == "on":
    assert return_freed_memory()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

MB = 1 << 20
torch.ones(17 * MB, dtype=torch.uint8)
large, small = [], []
for _ in range(40):
    large.append(torch.ones(17 * MB, dtype=torch.uint8))
    small.append(torch.ones(64 * 1024, dtype=torch.uint8))
before = rss()
del large
print((before - rss()) / MB)
"""


def released_mb(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # no MALLOC_* from the caller
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip())


@pytest.mark.slow
def test_freed_layer_sized_blocks_go_back_to_the_os():
    assert released_mb("on") > 0.9 * 40 * 17  # every freed block (680 MB) returned
    # the fault it fixes: with glibc's default the same blocks stay with the process
    assert released_mb("off") < 0.1 * 40 * 17


def test_a_threshold_set_in_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_freed_memory() is False


def test_only_zero3_launches_set_it(monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert not zero3_launched()  # no DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "configs/deepspeed/zero3.json"))
    assert zero3_launched()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "configs/deepspeed/zero2.json"))
    assert not zero3_launched()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # a stage given on the command line wins
    assert zero3_launched()
