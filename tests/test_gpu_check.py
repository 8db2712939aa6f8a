"""The prepared device check (tools/gpu_check.py) at a tiny shape on the CPU, as the GPU machine
runs it: without trl, datasets, deepspeed or vLLM (its image has none of them), nor the project's
other optional-at-run-time packages. So the check cannot rot between the rare GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# absent from the GPU machine's image (torch, transformers, accelerate, peft, pyarrow and their
# dependencies are there); None in sys.modules makes `import name` fail as if not installed
ABSENT = ("trl", "datasets", "deepspeed", "vllm", "wandb", "tensorboard", "matplotlib", "uvicorn", "gguf")
BLOCK = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"


def run_blocked(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLHF_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow  # a launched process
def test_stage3_imports_without_trl_datasets_deepspeed_vllm():
    code = "import stages.ppo.train, launch.stage3_ppo, tools.gpu_check\nprint('imported')"
    result = run_blocked(code)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow  # four short PPO/GRPO runs, ~15 s of CPU
def test_gpu_check_runs_on_cpu_at_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--shape", "tiny-llama", "--steps", "1", "--prompts", "8", "--new-tokens", "4", "--minibatches", "2"]
    code = (
        "import runpy\n"
        f"sys.argv = ['launch/gpu_check.py', *{args!r}, '--out', {str(out)!r}]\n"
        "runpy.run_path('launch/gpu_check.py', run_name='__main__')\n"
    )
    result = run_blocked(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["shape"] == "tiny-llama"
    assert list(report["results"]) == ["ppo_lora", "ppo_full", "ppo_shared", "grpo"]
    for name, r in report["results"].items():
        for key in ("rollout_tokens_per_s", "train_tokens_per_s", "mfu", "mfu_train", "peak_memory_gb", "step_s"):
            assert r[key] > 0, (name, key)
        assert r["mfu"] < 1 and r["memory"] == "cpu_max_rss" and r["timed_steps"] == 1
    # the table: a header and one row per run, with MFU and tokens/s
    assert "MFU" in result.stdout and "rollout tok/s" in result.stdout
    assert all(name in result.stdout for name in report["results"])
