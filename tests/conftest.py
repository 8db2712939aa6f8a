"""Shared test set-up: no hub, no network dashboards, small thread pools, and helpers to run the
real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


# The tiny config each stage launcher's tests run on. A launcher given no --config runs the generic
# defaults (rlhf/config), meant for a pretrained model and your own data; the tests name the tiny one.
TINY_CONFIGS = {
    "launch/stage1_sft.py": "configs/tiny/sft.yaml",
    "launch/stage2_rm.py": "configs/tiny/rm.yaml",
    "launch/stage3_ppo.py": "configs/tiny/ppo.yaml",
    "launch/stage3_dpo.py": "configs/tiny/dpo.yaml",
    "launch/stage2_label.py": "configs/tiny/label.yaml",
    "launch/stage3_kto.py": "configs/tiny/kto.yaml",
    "launch/stage3_orpo.py": "configs/tiny/orpo.yaml",
    "launch/stage3_cpo.py": "configs/tiny/simpo.yaml",
    # the pipeline tests (rounds, resume, the report's RM and proxy plots) run the SFT -> RM -> PPO road;
    # the default file, SFT -> DPO -> PPO, has its own (test_implicit_source.py)
    "launch/pipeline.py": "configs/tiny/pipeline_rm.yaml",
}


def tiny_config(script: str, args) -> list[str]:
    """`--config <the stage's tiny YAML>` unless `args` name a config."""
    if script not in TINY_CONFIGS or "--config" in args:
        return []
    return ["--config", str(ROOT / TINY_CONFIGS[script])]


# the test being set up or run: whether it is marked slow (run_entry refuses to launch otherwise)
RUNNING = {"slow": True}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test: module fixtures that launch entry points run in its setup."""
    RUNNING["slow"] = item.get_closest_marker("slow") is not None


def run_entry(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher (e.g. launch/stage1_sft.py) as a user would, in a subprocess, on the stage's
    tiny config unless `args` name another. Only from a test marked slow: the fast tier
    (`make test-fast`, docs/tests.md) launches nothing."""
    if not RUNNING["slow"]:
        raise AssertionError(f"run_entry({script}) from a test not marked slow: add @pytest.mark.slow (docs/tests.md)")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        # the config after the overrides (they apply after it wherever they stand), so the command a
        # stage records (its model card) starts as the test wrote it
        [sys.executable, str(ROOT / script), *args, *tiny_config(script, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def seed_000_scripts() -> dict[str, str]:
    """The two Python scripts of seed 000 (test-set and SFT-set generators), verbatim."""
    files = sorted((SHARED / "seeds").glob("000_*.txt"))
    if not files:
        pytest.skip("../shared/seeds/000_*.txt not found beside the checkout")
    text = files[0].read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    scripts = {
        "test": next(b for b in blocks if "LLM_minus_test_data" in b),
        "sft": next(b for b in blocks if "LLM_minus_SFT_train_data" in b),
    }
    return scripts


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process test is a separate run: accelerate's process-wide state (device, mixed
    precision) set up by one test must not leak into the next, as it would not between runs."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
