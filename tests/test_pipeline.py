"""The pipeline end to end on test-sized models: stages chained, a summary table, a report whose
plots carry the run's own series, dashboards that agree with metrics.jsonl, finished stages
skipped on a re-run, and a kill -9 in the middle of PPO that the same command recovers from."""

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_entry, tiny_config
from rlhf import pipeline as pipeline_module
from rlhf import report as report_module
from rlhf.checkpoint import STAGES
from rlhf.cli import parse
from rlhf.config import ConfigError
from rlhf.pipeline import KINDS, check_held_out_agree, jobs, load_pipeline, resolved_stage_config
from rlhf.report import load_stage
from wandb_offline import history

# slow: every test runs the pipeline command (most train SFT -> RM -> PPO)
pytestmark = pytest.mark.slow

MINI = [
    "model=tiny-llama",
    "sft.task.train_size=1000",
    "sft.task.eval_size=24",
    "sft.task.test_per_bucket=12",
    "sft.train.max_steps=30",
    "sft.train.batch_size=32",
    "sft.optim.lr=3e-3",
    "sft.train.log_every=5",
    "sft.train.save_every=15",
    "rm.task.eval_size=24",  # every stage draws the same held-out splits (the pipeline checks)
    "rm.task.test_per_bucket=12",
    "rm.pairs.train_size=400",
    "rm.pairs.eval_size=48",
    "rm.train.max_steps=20",
    "rm.train.batch_size=16",
    "rm.train.log_every=5",
    "rm.train.save_every=10",
    "ppo.task.train_size=200",
    "ppo.task.eval_size=24",
    "ppo.task.test_per_bucket=12",
    "ppo.rollout.prompts_per_step=16",
    "ppo.ppo.minibatches=2",
    "ppo.ppo.value_warmup_steps=0",
    "ppo.rollout.generation.max_new_tokens=6",
    "ppo.generation.max_new_tokens=6",
    "ppo.train.eval_every=4",
    "ppo.train.save_every=2",
    "ppo.train.log_every=1",
]
QUIET = [f"{s}.tracking.progress=false" for s in ("sft", "rm", "ppo")]
# A pipeline that only shows the wiring: two steps per stage, no on-policy mining, a few eval items.
SMALLEST = [
    "model=tiny-llama",
    *(f"{s}.{k}" for s in ("sft", "rm", "ppo") for k in ("tracking.progress=false", "tracking.report_to=[]")),
    *("sft.task.train_size=64", "sft.task.eval_size=8", "sft.evaluate_base=false", "sft.train.max_steps=2"),
    *(f"{s}.task.{k}" for s in ("sft", "rm", "ppo") for k in ("eval_size=8", "test_per_bucket=4")),
    *("sft.train.batch_size=8", "rm.pairs.train_size=64", "rm.pairs.eval_size=8", "rm.pairs.onpolicy_fraction=0"),
    *("rm.train.max_steps=2", "rm.train.batch_size=8", "ppo.task.train_size=32", "ppo.task.eval_size=8"),
    *("ppo.rollout.prompts_per_step=8", "ppo.ppo.minibatches=2", "ppo.rollout.generation.max_new_tokens=4"),
    *("ppo.generation.max_new_tokens=4", "ppo.train.max_steps=1", "ppo.train.eval_every=0"),
]


def pipeline(runs, name, *extra, timeout=900):
    return run_entry("launch/pipeline.py", f"runs_dir={runs}", f"name={name}", *MINI, *QUIET, *extra, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = pipeline(runs, "mini", "ppo.train.max_steps=8")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return runs / "mini", result


def test_the_stage_names_are_defined_once():
    """The pipeline's stages and the report's are one tuple (rlhf/checkpoint.py), not two copies that can drift."""
    assert pipeline_module.STAGES is STAGES and report_module.STAGES is STAGES


def test_stages_chain_and_summary(run):
    run_dir, result = run
    for stage in ("sft", "rm", "ppo"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["finished"] and manifest["stage"] == stage
    rm = json.loads((run_dir / "rm" / "manifest.json").read_text())
    assert rm["model"] == str(run_dir / "sft") and str(run_dir / "sft") in rm["inputs"]
    assert "Pipeline summary" in result.stdout and "accuracy after" in result.stdout
    assert "tensorboard --logdir" in result.stdout and (run_dir / "logs" / "ppo.log").is_file()


def test_rerun_skips_finished_stages(run):
    run_dir, _ = run
    again = pipeline(run_dir.parent, "mini", "ppo.train.max_steps=8", "--dry-run")
    assert again.returncode == 0
    assert all(f"{s}: finished output" in again.stdout for s in ("sft", "rm", "ppo"))
    changed = pipeline(run_dir.parent, "mini", "ppo.train.max_steps=9", "--dry-run")
    assert "sft: finished output" in changed.stdout and "ppo: finished output" not in changed.stdout


def test_a_finished_run_addressed_by_another_path_from_another_directory_is_current(run, tmp_path):
    """The same runs directory, spelled otherwise and from another working directory: every stage
    is still finished and current (the inputs enter by content, not by how their path is written;
    this re-trained the RM and PPO from scratch)."""
    run_dir, _ = run
    runs = run_dir.parent
    other = f"{runs.parent}/../{runs.parent.name}/{runs.name}"
    cmd = [sys.executable, str(ROOT / "launch/pipeline.py"), *tiny_config("launch/pipeline.py", ())]
    cmd += [f"runs_dir={other}", "name=mini", *MINI, *QUIET]
    cmd += ["ppo.train.max_steps=8", "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"{s}: finished output" in again.stdout for s in ("sft", "rm", "ppo")), again.stdout[-3000:]


def test_report_embeds_every_plot_with_the_runs_own_data(run):
    run_dir, _ = run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    data = json.loads((run_dir / "plots" / "data.json").read_text())
    expected = [
        "sft_loss",
        "rm_loss",
        "rm_accuracy",
        "rm_score_histogram",
        "ppo_score",
        "ppo_kl",
        "ppo_entropy",
        "ppo_clipfrac",
        "ppo_value_loss",
        "ppo_explained_variance",
    ]
    for name in expected:
        png = (run_dir / "plots" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in page, f"{name}.png not embedded"
        assert name in data
    stages = {s: load_stage(run_dir / s) for s in ("sft", "rm", "ppo")}
    # the plotted series are the ones in metrics.jsonl (step by step)
    sft_loss = [
        (r["step"], r["train/sft/loss"]) for r in _jsonl(run_dir / "sft" / "metrics.jsonl") if "train/sft/loss" in r
    ]
    plotted = data["sft_loss"]["loss"]
    assert list(zip(plotted["x"], plotted["y"], strict=True)) == sft_loss and len(sft_loss) >= 5
    assert data["ppo_kl"]["KL (per response)"]["y"] == [v for _, v in stages["ppo"]["series"]["train/ppo/kl"]]
    assert len(data["ppo_kl"]["β"]["x"]) == 8
    # each reward source is a line of its own on ppo_score, by its name: the tiny default's reward model
    assert data["ppo_score"]["rm"]["y"] == [v for _, v in stages["ppo"]["series"]["train/reward/rm"]]
    rm_eval = json.loads((run_dir / "rm" / "eval.json").read_text())
    assert data["rm_score_histogram"]["chosen"] == rm_eval["scores"]["chosen"]
    # tables: accuracy per digit bucket for base, SFT and PPO; samples before and after PPO
    for text in (
        "base (before SFT)",
        "<td>SFT</td>",
        "<td>PPO</td>",
        "2-digit",
        "5-digit",
        "before",
        "after",
        "Wall time and throughput",
    ):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # opens from disk, no network


def test_report_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium)")
    run_dir, _ = run
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            (run_dir / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    assert pixels[..., :3].std() > 0.05  # not a blank page: text, tables and plots drawn


def test_dashboards_hold_the_same_series_as_metrics_jsonl(run):
    run_dir, _ = run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("sft", "rm", "ppo"):
        expected = {k: dict(v) for k, v in load_stage(run_dir / stage)["series"].items()}
        wandb_files = list((run_dir / stage / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_files) == 1, wandb_files
        logged = history(wandb_files[0])
        events = EventAccumulator(str(next((run_dir / stage / "tensorboard").iterdir())), size_guidance={"scalars": 0})
        events.Reload()
        board = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
        for key, series in expected.items():
            assert logged[key] == pytest.approx(series), (stage, key)
            assert board[key] == pytest.approx(series, rel=1e-6), (stage, key)
    tables = [t for t in load_stage(run_dir / "ppo")["tables"] if t["table"] == "samples/ppo"]
    assert tables and tables[0]["columns"] == ["prompt", "response", "score", "kl"]


def test_kill_minus_9_in_ppo_then_same_command_finishes(tmp_path):
    runs = tmp_path / "runs"
    args = [
        f"runs_dir={runs}",
        "name=crash",
        *MINI,
        *QUIET,
        "ppo.train.max_steps=24",
        "ppo.train.save_every=3",
        "sft.tracking.report_to=[]",
        "rm.tracking.report_to=[]",
        "ppo.tracking.report_to=[]",
    ]
    cmd = [sys.executable, str(ROOT / "launch/pipeline.py"), *tiny_config("launch/pipeline.py", ()), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    marker = runs / "crash" / "ppo" / "checkpoints" / "step-3" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "pipeline ended before PPO's first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline, accelerate and the stage, all at once
    proc.wait()
    assert not (runs / "crash" / "ppo" / "manifest.json").exists()

    again = run_entry("launch/pipeline.py", *args, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sft: finished output" in again.stdout and "rm: finished output" in again.stdout
    assert re.search(r"resumed from .*step-\d+", (runs / "crash" / "logs" / "ppo.log").read_text())
    assert json.loads((runs / "crash" / "ppo" / "manifest.json").read_text())["metrics"]["steps"] == 24


def test_failed_stage_stops_with_its_code_and_log(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    result = pipeline(tmp_path / "runs", "fail", f"sft.data.train={bad}")
    assert result.returncode == 2
    assert f"sft failed with exit code 2; log: {tmp_path / 'runs' / 'fail' / 'logs' / 'sft.log'}" in result.stderr
    assert not (tmp_path / "runs" / "fail" / "rm").exists()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and "table" not in line]


def test_a_name_with_a_hash_sends_each_stage_to_its_own_directory(tmp_path):
    # `name="exp #2"` (quoted, as the error for an unquoted ' #' asks): the paths handed to the
    # stages used to be re-read as YAML, so ' #2/sft' was a comment and every stage wrote runs/exp.
    runs = tmp_path / "runs"
    result = run_entry("launch/pipeline.py", f"runs_dir={runs}", 'name="exp #2"', "report=false", "--dry-run")
    assert result.returncode == 0, result.stderr
    run_dir = runs / "exp #2"
    configs = {}
    for line in result.stdout.splitlines():
        stage, _, command = line.removeprefix("[pipeline] ").partition(": ")
        args = shlex.split(command)  # the command as printed is the command run
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        configs[stage] = parse(KINDS[stage].config_class, None, args[script + 1 :])[0]  # as the stage parses it
    assert [configs[s].output_dir for s in ("sft", "rm", "ppo")] == [str(run_dir / s) for s in ("sft", "rm", "ppo")]
    assert configs["rm"].model == configs["ppo"].policy == str(run_dir / "sft")
    assert configs["ppo"].reward_model == str(run_dir / "rm")
    assert configs["ppo"].tracking.run_name == "exp #2-ppo"

    # and for real, as small as a run gets: three directories, each with its own stage's output
    real = run_entry("launch/pipeline.py", f"runs_dir={runs}", 'name="exp #2"', "report=false", *SMALLEST, timeout=1800)
    assert real.returncode == 0, real.stdout[-3000:] + real.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage
    assert json.loads((run_dir / "rm" / "manifest.json").read_text())["model"] == str(run_dir / "sft")
    assert sorted(p.name for p in runs.iterdir()) == ["exp #2"]


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "", "exp #2"])
def test_names_that_leave_runs_dir_or_get_eaten_are_refused(tmp_path, name):
    result = run_entry("launch/pipeline.py", f"runs_dir={tmp_path}", f"name={name}", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "config key 'name'" in result.stderr
    assert not any(tmp_path.iterdir())


TINY = [
    "model=tiny-llama",
    "report=false",
    "sft.task.train_size=256",
    "sft.task.eval_size=8",
    *(f"{s}.task.{k}" for s in ("sft", "rm", "ppo") for k in ("eval_size=8", "test_per_bucket=4")),
    "sft.evaluate_base=false",
    "sft.train.batch_size=8",
    "sft.train.max_steps=4",
    "sft.train.save_every=2",
    "rm.pairs.train_size=128",
    "rm.pairs.eval_size=16",
    "rm.train.batch_size=8",
    "rm.train.max_steps=4",
    "rm.train.save_every=2",
    "rm.train.log_every=1",
    "rm.pairs.onpolicy_fraction=0",
    "ppo.task.train_size=64",
    "ppo.task.eval_size=8",
    "ppo.rollout.prompts_per_step=8",
    "ppo.ppo.minibatches=2",
    "ppo.ppo.value_warmup_steps=0",
    "ppo.rollout.generation.max_new_tokens=4",
    "ppo.generation.max_new_tokens=4",
    "ppo.train.max_steps=2",
    "ppo.train.save_every=1",
    "ppo.train.eval_every=0",
    *[f"{s}.tracking.report_to=[]" for s in ("sft", "rm", "ppo")],
]


def test_upstream_rerun_makes_downstream_start_afresh(tmp_path):
    """Item 1: SFT re-trains after a config change; RM and PPO must not resume from checkpoints
    made from the old SFT (their own configs did not change), but start afresh, the old
    checkpoints moved aside."""
    first = pipeline(tmp_path, "up", *TINY)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    again = pipeline(tmp_path, "up", *TINY, "sft.train.max_steps=6")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    run_dir = tmp_path / "up"
    sft_hash = json.loads((run_dir / "sft" / "manifest.json").read_text())["config_hash"]
    for stage in ("rm", "ppo"):
        log = (run_dir / "logs" / f"{stage}.log").read_text().split("=====")[-1]  # the second run's part
        assert "resum" not in log.lower(), (stage, log[-3000:])
        assert len(list((run_dir / stage).glob("checkpoints.stale-*"))) == 1, stage
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["inputs"][str(run_dir / "sft")] == sft_hash
    rm_steps = [r["step"] for r in _jsonl(run_dir / "rm" / "metrics.jsonl") if "train/rm/loss" in r]
    assert rm_steps[0] == 1 and max(rm_steps) == 4  # a whole fresh run, not one step from the old end


def test_stages_that_would_draw_different_held_out_splits_are_refused(tmp_path):
    """One stage's test items must not be another's training items: every stage draws the same
    validation and test splits, or the pipeline stops before running anything."""
    config = str(ROOT / "configs/tiny/pipeline_rm.yaml")
    check_held_out_agree(load_pipeline(config, []))  # the shipped configs agree, the default's too
    check_held_out_agree(load_pipeline(str(ROOT / "configs/tiny/pipeline.yaml"), []))
    for override, key in (
        ("ppo.task.test_seed=7", "ppo.task.test_seed"),
        ("rm.task.eval_size=24", "rm.task.eval_size"),
    ):
        with pytest.raises(ConfigError) as err:
            check_held_out_agree(load_pipeline(config, [override]))
        assert err.value.key == key and "same held-out splits" in str(err.value)
    result = run_entry("launch/pipeline.py", f"runs_dir={tmp_path}", "sft.task.test_per_bucket=10", "--dry-run")
    assert result.returncode == 2 and "'rm.task.test_per_bucket'" in result.stderr and not any(tmp_path.iterdir())


def test_rounds_use_the_pipelines_label_config_and_their_held_out_splits_are_checked():
    # tiny-addrev's rounds labelled subtraction prompts (configs/tiny/label.yaml, the default), and
    # the check covered only the first round's stages.
    addrev = str(ROOT / "configs/tiny-addrev/pipeline.yaml")
    cfg = load_pipeline(addrev, ["rounds=2"])
    check_held_out_agree(cfg)
    label = next(j for j in jobs(cfg) if j.kind == "label")
    assert resolved_stage_config(cfg, label).task.name == "addition_reversed"
    tiny = str(ROOT / "configs/tiny/pipeline_rm.yaml")
    check_held_out_agree(load_pipeline(tiny, ["rounds=3"]))
    for overrides, key in (
        (["label.config=configs/tiny/label.yaml"], "round-2/label.task.name"),
        (["label.task.eval_size=24"], "round-2/label.task.eval_size"),
        (['round.ppo_overrides=["task.test_seed=7"]'], "round-2/ppo.task.test_seed"),
    ):
        pipeline_yaml = addrev if key.endswith("task.name") else tiny
        with pytest.raises(ConfigError) as err:
            check_held_out_agree(load_pipeline(pipeline_yaml, ["rounds=2", *overrides]))
        assert err.value.key == key and "same held-out splits" in str(err.value)


def test_a_first_label_stage_feeds_sft_its_passing_answers_and_rm_and_dpo_its_pairs(tmp_path):
    # The own-samples pipeline (configs/smollm2-135m/constraints.yaml): sample the starting model,
    # SFT on its answers the checker passes (rejection sampling), RM and DPO on the labelled pairs.
    tiny = str(ROOT / "configs/tiny/pipeline_rm.yaml")
    cfg = load_pipeline(tiny, [f"runs_dir={tmp_path}", "name=own", "stages=[label, sft, rm, ppo, dpo]"])
    configs = {j.name: resolved_stage_config(cfg, j) for j in jobs(cfg)}
    run = tmp_path / "own"
    assert list(configs) == ["label", "sft", "rm", "ppo", "dpo"]
    assert (configs["label"].policy, configs["label"].round, configs["label"].reward_model) == ("tiny", 1, None)
    assert configs["label"].output_dir == str(run / "label")
    assert configs["sft"].data.train == str(run / "label/best.jsonl") and configs["sft"].model == "tiny"
    for stage in ("rm", "dpo"):
        data = configs[stage].data
        assert (data.train, data.eval) == (str(run / "label/pairs.jsonl"), str(run / "label/eval_pairs.jsonl"))
    # without it, nothing changes: the stages read their configured (here: generated) data
    plain = {j.name: resolved_stage_config(load_pipeline(tiny, []), j) for j in jobs(load_pipeline(tiny, []))}
    assert plain["sft"].data.train is None and plain["rm"].data.train is None
    with pytest.raises(ConfigError, match="label samples the starting model: it can only come first"):
        load_pipeline(tiny, ["stages=[sft, label, rm, ppo]"])
