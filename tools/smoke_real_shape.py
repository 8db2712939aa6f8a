"""The configs/qwen2.5-0.5b/ pipeline at Qwen2.5-0.5B's real shape, on this machine: sizing figures
without a GPU or a download.

    python -m tools.smoke_real_shape                    # one process, then two-process ZeRO-3
    python -m tools.smoke_real_shape --mode single      # or --mode zero3: one of them
    python -m tools.smoke_real_shape --steps 2 --out /tmp/smoke --fresh

Stages run one at a time; the same command again skips the stages an earlier invocation finished
(keeping their figures) and runs the rest, so the run can be split where a time limit needs it.

The model is the `qwen2.5-0.5b-shape` preset: Qwen2.5-0.5B-Instruct's architecture (494M parameters,
151,936 tied embedding rows, 24 layers, GQA 14/2; rlhf/registry/presets.py) with random weights and
our tokenizer. The pipeline is configs/qwen2.5-0.5b/pipeline.yaml as shipped (LoRA r=16, gradient
checkpointing, its learning rates, precision and sequence lengths) with only the amount of work
cut down (SMALL below): a few steps per stage, small batches, short generations, tiny eval sets.
Mode `single` launches each stage with configs/accelerate/single.yaml, `zero3` with
configs/accelerate/zero3.yaml and two processes (gloo on a CPU).

Per stage and mode it prints:
- peak RSS of each training process (its VmHWM, read from /proc every half second while it runs;
  the accelerate launcher itself is left out);
- seconds per optimizer step, from the first logged step to the last (the first step, which
  includes warm-up, is left out): SFT and RM from the step timestamps of metrics.jsonl, PPO from
  its own per-step timings (generate + score + train);
- tokens per second over the same steps, all processes together: SFT and RM count the real
  (unpadded) tokens trained on (`num_tokens`), PPO the generated response tokens (`tokens_per_s`).
The last line is one JSON object with every figure. Any failed stage, or a missing figure, ends
the script with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

from rlhf.checkpoint import atomic_write_json, read_manifest
from rlhf.pipeline import KINDS, load_pipeline, run

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs/qwen2.5-0.5b/pipeline.yaml"
MODES = {"single": ("configs/accelerate/single.yaml", 1), "zero3": ("configs/accelerate/zero3.yaml", 2)}
STAGES = ("sft", "rm", "ppo")

# What changes from the shipped configs: the amount of work, never the model set-up. Steps are
# added from --steps. Evaluation and saving stay on (they run at the end of each stage), with
# tiny eval sets; no in-loop evaluation or intermediate checkpoints, so step times are clean.
SMALL = {
    "sft": [
        "task.train_size=64",
        "train.batch_size=2",
        "train.grad_accum=1",
        "generation.max_new_tokens=8",
    ],
    "rm": [
        "pairs.train_size=32",
        "pairs.eval_size=4",
        "train.batch_size=2",
    ],
    "ppo": [
        "task.train_size=32",
        "rollout.prompts_per_step=4",
        "ppo.minibatches=2",
        "train.grad_accum=2",
        "rollout.generation.max_new_tokens=8",
        "generation.max_new_tokens=8",
    ],
}
EVERY_STAGE = [
    # Every stage draws the same held-out splits (rlhf/pipeline.py refuses stages that disagree):
    # a few validation and test items, so the end-of-stage evaluation stays short at this size.
    "task.eval_size=4",
    "task.test_per_bucket=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "tracking.report_to=[]",
    "tracking.progress=false",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (at least 2)")
    parser.add_argument("--out", default="runs", help="runs directory; each mode's run is <out>/smoke-<mode>")
    parser.add_argument("--fresh", action="store_true", help="start afresh instead of keeping finished stages")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step (warm-up) is not timed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
    results = {}
    for mode in MODES if args.mode == "both" else [args.mode]:
        code, results[mode] = run_mode(mode, args.steps, Path(args.out), args.fresh)
        if code != 0:
            print(f"[smoke] {mode}: the pipeline failed with exit code {code}", file=sys.stderr)
            return code
    print(table(results))
    print(json.dumps({"model": "qwen2.5-0.5b-shape", "steps": args.steps, "results": results}))
    missing = [f"{m}/{s}/{k}" for m, r in results.items() for s, f in r.items() for k, v in f.items() if v is None]
    if missing:
        print(f"[smoke] figures missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def pipeline_config(mode: str, steps: int, runs_dir: Path):
    """The shipped qwen2.5-0.5b pipeline at the real shape, cut to `steps` steps of SMALL work,
    validated as `python launch/pipeline.py` would (every stage's held-out splits agree)."""
    accelerate_config, processes = MODES[mode]
    overrides = [
        f"name=smoke-{mode}",
        f"runs_dir={runs_dir}",
        "model=qwen2.5-0.5b-shape",
        "report=false",
        f"main_process_port={_free_port()}",
        *(f"{stage}.{o}" for stage in STAGES for o in [*SMALL[stage], *EVERY_STAGE, f"train.max_steps={steps}"]),
    ]
    return load_pipeline(str(PIPELINE), overrides, str(ROOT / accelerate_config), processes)


def run_mode(mode: str, steps: int, runs_dir: Path, fresh: bool) -> tuple[int, dict]:
    """The pipeline in `mode`, one stage at a time with its processes watched; (exit code, figures).
    A stage that finished in an earlier invocation of the same command keeps the figures recorded
    then (<run>/smoke_figures.json), so a long run can be finished in several invocations."""
    run_dir = runs_dir / f"smoke-{mode}"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = pipeline_config(mode, steps, runs_dir)
    saved = run_dir / "smoke_figures.json"
    figures = json.loads(saved.read_text()) if saved.is_file() else {}
    for stage in STAGES:
        if stage in figures and (read_manifest(run_dir / stage) or {}).get("finished"):
            print(f"[smoke] {mode}/{stage}: finished in an earlier invocation; its figures are kept", flush=True)
            continue
        watcher = PeakWatcher()
        watcher.start()
        try:
            code = run(cfg, only=stage)
        finally:
            watcher.stop()
        if code != 0:
            return code, figures
        figures[stage] = {
            "peak_rss_mb": watcher.peaks(Path(KINDS[stage].script).name) or None,
            **stage_figures(run_dir / stage, stage),
        }
        atomic_write_json(saved, figures)
    return 0, figures


class PeakWatcher:
    """Peak RSS (VmHWM) of every descendant process, by pid, with its command line and parent,
    polled."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.seen, self._stop = interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, script: str) -> list[int]:
        """Peak RSS in MB of each process running `script`, in order of start. Left out: the
        launcher, whose command line also names it, and processes a worker forked (data loading,
        tokenising), which carry its command line and share its pages."""
        running = {
            pid
            for pid, (cmd, _, _) in self.seen.items()
            if any(a.endswith(script) for a in cmd) and "accelerate.commands.launch" not in cmd
        }
        return [round(kb / 1024) for pid, (_, kb, ppid) in self.seen.items() if pid in running and ppid not in running]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in _descendants(os.getpid()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                except (OSError, ValueError):  # ended between listing and reading
                    continue
                kb = int(status.get("VmHWM", "0 kB").split()[0])
                # an exiting process reads as an empty command line: keep the one it ran with
                old_cmd, old_kb, _ = self.seen.get(pid, (cmd, 0, 0))
                self.seen[pid] = (cmd if any(cmd) else old_cmd, max(kb, old_kb), int(status["PPid"]))


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def stage_figures(stage_dir: Path, stage: str) -> dict:
    """Seconds per step and tokens per second after the first step, and the stage's wall time,
    from its metrics.jsonl and manifest.json; None where the stage left no record."""
    metrics_path, manifest_path = stage_dir / "metrics.jsonl", stage_dir / "manifest.json"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {
        **step_rates(records, stage),
        "wall_s": manifest.get("metrics", {}).get("wall_time_s"),
    }


def step_rates(records: list[dict], stage: str) -> dict:
    """{"s_per_step", "tokens_per_s"} over the logged training steps after the first.

    SFT / RM: each step's log holds its time and the running count of tokens trained on, so
    steps 1..n give (t_n - t_1) / (n - 1) seconds per step and (tokens_n - tokens_1) / (t_n - t_1)
    tokens per second. PPO logs each step's own time (generate + score + train) and tokens/s."""
    if stage == "ppo":
        steps = sorted((r for r in records if "train/ppo/tokens_per_s" in r), key=lambda r: r["step"])[1:]
        if not steps:
            return {"s_per_step": None, "tokens_per_s": None}
        times = [sum(r[f"train/ppo/time_{k}_s"] for k in ("generate", "score", "train")) for r in steps]
        tokens = sum(r["train/ppo/tokens_per_s"] * t for r, t in zip(steps, times, strict=True))
        return {"s_per_step": round(sum(times) / len(times), 2), "tokens_per_s": round(tokens / sum(times), 1)}
    key = f"train/{stage}/num_tokens"
    steps = sorted((r for r in records if key in r and f"train/{stage}/loss" in r), key=lambda r: r["step"])
    if len(steps) < 2:
        return {"s_per_step": None, "tokens_per_s": None}
    first, last = steps[0], steps[-1]
    seconds = last["time"] - first["time"]
    return {
        "s_per_step": round(seconds / (last["step"] - first["step"]), 2),
        "tokens_per_s": round((last[key] - first[key]) / seconds, 1),
    }


def table(results: dict) -> str:
    lines = [
        "",
        f"{'mode':<7}{'stage':<6}{'peak RSS MB per process':>26}{'s/step':>9}{'tokens/s':>10}{'wall s':>9}",
    ]
    for mode, stages in results.items():
        for stage, f in stages.items():
            rss = ", ".join(str(m) for m in f["peak_rss_mb"] or []) or "-"
            lines.append(
                f"{mode:<7}{stage:<6}{rss:>26}{_num(f['s_per_step']):>9}{_num(f['tokens_per_s']):>10}{_num(f['wall_s']):>9}"
            )
    lines.append("tokens/s: SFT and RM real tokens trained on, PPO generated tokens; all processes together")
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
