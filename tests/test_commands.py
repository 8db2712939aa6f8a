"""The commands as a new user meets them: a stage given a model and data and no --config runs the
generic defaults (no task, rlhf/config's settings), never the tiny recipe's; and the installed
console script `rlhf` runs a stage from any directory, without the checkout's launch/ or configs/."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from rlhf.cli import parse
from rlhf.config import DataConfig, ModelInit, SFTStageConfig
from rlhf.data.lengths import UNSTATED_CONTEXT, context_length
from rlhf.registry import load_tokenizer, resolve
from stages.commands import STAGE_COMMANDS

EXAMPLES = ROOT / "data" / "examples"


def test_no_config_is_the_generic_defaults_not_the_tiny_recipe():
    cfg, _ = parse(SFTStageConfig, None, ["model=tiny-llama", "data.train=mine.jsonl"])
    assert cfg.task.name is None  # nothing generated, nothing scored as subtraction
    assert cfg.optim.lr == 1e-4 and cfg.data.max_length is None  # not configs/tiny/sft.yaml's 1e-3 and 64
    tiny, _ = parse(SFTStageConfig, str(ROOT / "configs/tiny/sft.yaml"), [])
    assert tiny.task.name == "subtraction" and tiny.optim.lr == 1e-3 and tiny.data.max_length == 64


@pytest.mark.parametrize("name", sorted(STAGE_COMMANDS))
def test_every_stage_command_defaults_to_no_task_and_the_models_context(name):
    config_class, target = STAGE_COMMANDS[name]
    cfg, _ = parse(config_class, None, ["reward_model=runs/x/rm"] if name == "ppo" else [])
    assert cfg.task.name is None and cfg.data.max_length is None
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_max_length_is_the_models_context_unless_set():
    tokenizer = load_tokenizer(resolve("tiny-llama"), ModelInit())  # the tiny tokenizer states 512
    assert context_length(DataConfig(), tokenizer) == 512
    assert context_length(DataConfig(max_length=64), tokenizer) == 64
    tokenizer.model_max_length = int(1e30)  # transformers' value for a tokenizer that states none
    assert context_length(DataConfig(), tokenizer) == UNSTATED_CONTEXT == 2048


@pytest.mark.slow
def test_a_launcher_without_config_prints_the_generic_defaults():
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch/stage1_sft.py"), "--print-config", "data.train=mine.jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the YAML, without what an imported library prints on stdout first ("[INFO] Running in WANDB ...")
    cfg = yaml.safe_load("\n".join(line for line in result.stdout.splitlines() if not line.startswith("[")))
    assert cfg["task"]["name"] is None and cfg["optim"]["lr"] == 1e-4, cfg


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` of what the package ships (pyproject.toml, rlhf/, stages/), into a folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("rlhf", "stages"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    result = subprocess.run([*pip, str(src)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


@pytest.mark.slow
def test_the_console_script_runs_a_stage_from_another_directory_and_scores_no_task(installed, tmp_path):
    work = tmp_path / "elsewhere"  # no launch/, no configs/ here
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONUNBUFFERED": "1"}
    args = ["sft", "model=tiny-llama", f"data.train={EXAMPLES / 'sft_prompt_completion.jsonl'}"]
    args += [f"data.eval={EXAMPLES / 'sft_messages.jsonl'}", "train.max_steps=2", "train.batch_size=4"]
    args += ["tracking.report_to=[]", "tracking.progress=false", "output_dir=out"]
    result = subprocess.run(
        [str(installed / "bin" / "rlhf"), *args], cwd=work, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "task:" not in result.stderr  # no generated split was read
    out = work / "out"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["task"]["name"] is None and resolved["optim"]["lr"] == 1e-4
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["task"] is None and evaluation["split"] == "validation"  # the given file, exact match only
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_pipeline_launches_stages_as_modules_where_launch_is_not_shipped(installed, tmp_path, monkeypatch):
    """Installed, rlhf/pipeline.py has no launch/ beside it: each stage runs as
    `accelerate launch -m stages.commands <stage>`, which works from any directory."""
    import rlhf.pipeline as pipeline

    cfg = pipeline.load_pipeline(str(ROOT / "configs/tiny/pipeline_rm.yaml"), [f"runs_dir={tmp_path}"])
    assert str(ROOT / "launch/stage1_sft.py") in pipeline.launch_command(cfg, "sft")  # a checkout: its launcher
    monkeypatch.setattr(pipeline, "ROOT", installed)
    cmd = pipeline.launch_command(cfg, "rm")
    assert cmd[cmd.index("-m", 2) : cmd.index("-m", 2) + 3] == ["-m", "stages.commands", "rm"]
    env = {**os.environ, "PYTHONPATH": str(installed)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    result = subprocess.run(
        [*launch, "-m", "stages.commands", "rm", "--print-config", "model=tiny-llama"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: tiny-llama" in result.stdout
