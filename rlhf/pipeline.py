"""The whole pipeline in one command: SFT -> reward model -> PPO, each stage its own
`accelerate launch` process, each stage's output feeding the next.

    python launch/pipeline.py                                   # the tiny default: SFT -> DPO -> PPO
    python launch/pipeline.py --config configs/tiny/pipeline_rm.yaml   # the tiny SFT -> RM -> PPO
    python launch/pipeline.py --config configs/qwen2.5-0.5b/pipeline.yaml name=qwen \\
        --accelerate-config configs/accelerate/zero3.yaml --num-processes 8
    python launch/pipeline.py name=try sft.train.max_steps=200 --from-stage dpo

Everything lands in runs/<name>/: sft/, rm/ (or dpo/), ppo/, logs/<stage>.log, report.html. A stage whose
finished output was made from what its resolved config names now (manifest.json's config_hash,
rlhf/checkpoint.py `content_hash`: data files by their bytes, earlier stages by their manifest,
however the paths are written) is skipped; an interrupted stage resumes from its last complete checkpoint when
the same command runs again. A failed stage stops the pipeline with the stage's exit code and the
path of its log. `--from-stage` / `--only` re-run a stage afresh: its checkpoints are moved aside
(checkpoints.forced-<time>) once its lock is taken; a live run holding it stops the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.checkpoint import (
    STAGES,
    ManifestError,
    OutputInUseError,
    content_hash,
    lock_output,
    move_aside,
    read_manifest,
    release_output_locks,
)
from rlhf.config import ConfigError, load_config
from rlhf.config.schema import format_override, parse_override
from rlhf.config.stages import (
    DPOStageConfig,
    LabelStageConfig,
    PPOStageConfig,
    RMStageConfig,
    SFTStageConfig,
)
from rlhf.proxy_gold import best_gold, divergence, run_points

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StageKind:
    """What the pipeline knows of one kind of stage: how to launch it, its config class, and the
    keys that wire it to the run (`run`: runs/<name>) and to the stages before it (`needs`)."""

    script: str
    config_class: type
    wiring: Callable[[PipelineConfig, Path], dict[str, str]]
    needs: tuple[str, ...] = ()  # the stages that must come before it; "a|b": one of them


# A new kind of stage is a new line here (and a StageSpec field of PipelineConfig).
KINDS: dict[str, StageKind] = {
    "sft": StageKind(
        "launch/stage1_sft.py", SFTStageConfig, lambda cfg, run: {"model": cfg.model, **_sampled(cfg, run)}
    ),
    "rm": StageKind(
        "launch/stage2_rm.py", RMStageConfig, lambda cfg, run: {"model": str(run / "sft"), **_pairs(cfg, run)}, ("sft",)
    ),
    # the reward model: the RM stage's, or where there is none a DPO stage's output, whose implicit
    # reward the PPO config reads (a reward source of kind `implicit`)
    "ppo": StageKind(
        "launch/stage3_ppo.py",
        PPOStageConfig,
        lambda cfg, run: {
            "policy": str(run / "sft"),
            "reward_model": str(run / ("rm" if "rm" in cfg.stages else "dpo")),
        },
        ("sft", "rm|dpo"),
    ),
    "dpo": StageKind(
        "launch/stage3_dpo.py",
        DPOStageConfig,
        lambda cfg, run: {"policy": str(run / "sft"), **_pairs(cfg, run)},
        ("sft",),
    ),
    # the starting model's own samples, labelled (first in `stages`): SFT data by rejection sampling
    # (best.jsonl) and the pairs of the RM and DPO; in rounds after the first, the last policy's
    # comparisons (wired by round_wiring below)
    "label": StageKind(
        "launch/stage2_label.py",
        LabelStageConfig,
        lambda cfg, run: {"policy": cfg.model, "reward_model": None, "round": 1},
    ),
}


def _sampled(cfg: PipelineConfig, run: Path) -> dict[str, str]:
    """SFT's data where a first `label` stage sampled the model: its passing answers (best of K)."""
    return {"data.train": str(run / "label" / "best.jsonl")} if "label" in cfg.stages else {}


def _pairs(cfg: PipelineConfig, run: Path) -> dict[str, str]:
    """The RM's and DPO's pairs where a first `label` stage made them: its labelled comparisons."""
    if "label" not in cfg.stages:
        return {}
    return {"data.train": str(run / "label" / "pairs.jsonl"), "data.eval": str(run / "label" / "eval_pairs.jsonl")}


ROUND_STAGES = ("label", "rm", "ppo")  # what each round after the first runs, in runs/<name>/round-K/
SPECS = (*STAGES, "label")  # the stage configs a pipeline holds (`<stage>.<key>=value` overrides go to them)


@dataclass(frozen=True)
class StageSpec:
    config: str  # the stage's YAML
    overrides: tuple[str, ...] = ()  # key.sub=value applied on top of it


@dataclass(frozen=True)
class RoundSpec:
    """Rounds after the first (seed 002): label the last policy's samples, continue the reward model
    from its last weights on its pairs plus every round's comparisons so far, run PPO again from the
    last policy. Each round's stages read the rm / ppo / label configs with these overrides on top."""

    reference: Literal["sft", "previous"] = "sft"  # PPO's frozen reference: the SFT model or the last policy
    rm_overrides: tuple[str, ...] = ()  # e.g. train.max_steps=1500 (a continuation, not a fresh RM)
    ppo_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    """Names the run, the base model, the per-stage configs and how to launch them."""

    name: str = "tiny"  # everything goes to <runs_dir>/<name>/
    runs_dir: str = "runs"
    model: str = "tiny"  # stage 1's starting model: preset, local directory or hub id
    accelerate_config: str | None = "configs/accelerate/single.yaml"  # see configs/accelerate/
    num_processes: int | None = None  # override the accelerate config's process count
    main_process_port: int | None = None  # for several pipelines on one machine
    report: bool = True  # write runs/<name>/report.html at the end
    # the stages this pipeline runs, in order: [sft, rm, ppo], or [sft, dpo] for DPO instead of RM + PPO,
    # or [sft, dpo, ppo]: PPO on the DPO model's implicit reward (the PPO config's source of kind implicit);
    # [label, sft, rm, ppo]: sample the model first, SFT on its passing answers, RM / DPO on its pairs
    stages: tuple[str, ...] = ("sft", "rm", "ppo")
    sft: StageSpec = field(default_factory=lambda: StageSpec("configs/tiny/sft.yaml"))
    rm: StageSpec = field(default_factory=lambda: StageSpec("configs/tiny/rm.yaml"))
    ppo: StageSpec = field(default_factory=lambda: StageSpec("configs/tiny/ppo.yaml"))
    dpo: StageSpec = field(default_factory=lambda: StageSpec("configs/tiny/dpo.yaml"))
    rounds: int = 1  # RLHF rounds; each one after the first runs label -> rm -> ppo in runs/<name>/round-K/
    label: StageSpec = field(default_factory=lambda: StageSpec("configs/tiny/label.yaml"))
    round: RoundSpec = field(default_factory=RoundSpec)

    def check(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds", f"must be >= 1, got {self.rounds}")
        if self.rounds > 1 and not {"rm", "ppo"} <= set(self.stages):
            raise ConfigError("rounds", "rounds after the first continue the RM and PPO: stages must hold rm and ppo")
        for i, stage in enumerate(self.stages):
            if stage not in KINDS:
                raise ConfigError("stages", f"unknown stage {stage!r}; known: {list(KINDS)}")
            if stage == "label" and i != 0:
                raise ConfigError("stages", "label samples the starting model: it can only come first")
            missing = [n for n in KINDS[stage].needs if not set(n.split("|")) & set(self.stages[:i])]
            if missing:
                what = missing[0].replace("|", " or ")
                raise ConfigError("stages", f"{stage} reads the output of {what}, which must come before it")
        # The name is one directory under runs_dir and a tracking run name: no path separators
        # or '..' that would put a run elsewhere or share another run's directories.
        bad = [c for c in ("/", "\\") if c in self.name]
        if not self.name.strip() or bad or ".." in self.name or self.name == ".":
            raise ConfigError(
                "name", f"must name one directory under runs_dir (no '/', '\\' or '..'), got {self.name!r}"
            )
        if self.name != self.name.strip() or not self.name.isprintable():
            raise ConfigError(
                "name", f"must not start or end with spaces or hold control characters, got {self.name!r}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run SFT -> reward model (RM or DPO) -> PPO",
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/pipeline.yaml"), help="pipeline YAML")
    parser.add_argument("--from-stage", help="re-run this stage (sft, rm, ppo, round-2/rm, …) and the ones after it")
    parser.add_argument("--only", help="run just this stage (its inputs must exist)")
    parser.add_argument("--accelerate-config", help="accelerate config file for every stage")
    parser.add_argument("--num-processes", type=int, help="processes per stage (e.g. GPUs per node)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands and exit")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="pipeline keys (name=..., model=...) or stage keys (sft.train.max_steps=...)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_pipeline(args.config, args.overrides, args.accelerate_config, args.num_processes)
        return run(cfg, args.from_stage, args.only, args.dry_run)
    except (ConfigError, ManifestError, OutputInUseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def load_pipeline(
    path: str, overrides: list[str], accelerate_config: str | None = None, num_processes: int | None = None
) -> PipelineConfig:
    """The pipeline config; `sft.train.max_steps=5`-style overrides go to that stage."""
    extra: dict[str, list[str]] = {s: [] for s in SPECS}
    own: list[str] = []
    for item in overrides:
        key, _ = parse_override(item)
        head, _, rest = key.partition(".")
        if head in SPECS and rest and rest.split(".")[0] not in ("config", "overrides"):
            extra[head].append(f"{rest}={item.split('=', 1)[1]}")
        else:
            own.append(item)
    cfg = load_config(PipelineConfig, path or None, own)  # the file with its `base:` files, then `own`
    changes = {
        s: dataclasses.replace(getattr(cfg, s), overrides=getattr(cfg, s).overrides + tuple(extra[s])) for s in SPECS
    }
    if accelerate_config:
        changes["accelerate_config"] = accelerate_config
    if num_processes:
        changes["num_processes"] = num_processes
    return dataclasses.replace(cfg, **changes)


@dataclass(frozen=True)
class Job:
    """One stage to run: its kind (a KINDS key), its name (its directory under runs/<name>/ and its
    log's name: `rm`, or `round-2/rm` in a later round) and its wiring (typed overrides)."""

    kind: str
    name: str
    wiring: dict
    overrides: tuple[str, ...] = ()  # the round's own overrides, on top of the stage config's


def jobs(cfg: PipelineConfig) -> list[Job]:
    """Every stage of the run in order: the first round's `stages`, then label -> rm -> ppo for each
    further round."""
    run = Path(cfg.runs_dir) / cfg.name
    out = [Job(stage, stage, KINDS[stage].wiring(cfg, run)) for stage in cfg.stages]
    for k in range(2, cfg.rounds + 1):
        out += [Job(kind, f"round-{k}/{kind}", *round_wiring(cfg, run, k, kind)) for kind in ROUND_STAGES]
    return out


def round_wiring(cfg: PipelineConfig, run: Path, k: int, kind: str) -> tuple[dict, tuple[str, ...]]:
    """(wiring, overrides) of round k's `kind`: the label stage samples the last round's policy;
    the RM continues from the last round's RM on its pairs plus every round's comparisons so far
    (no on-policy mining: the comparisons are the policy's own samples; mining would sample the
    RM's trunk); PPO starts from the last round's policy, scored by this round's RM."""
    last = run if k == 2 else run / f"round-{k - 1}"
    here = run / f"round-{k}"
    if kind == "label":
        return {"policy": str(last / "ppo"), "reward_model": str(last / "rm"), "round": k}, ()
    if kind == "rm":
        extra = [str(run / f"round-{j}" / "label" / "pairs.jsonl") for j in range(2, k + 1)]
        wiring = {
            "model": str(last / "rm"),
            "pairs.extra_train": extra,
            "pairs.extra_eval": [str(here / "label" / "eval_pairs.jsonl")],
            "pairs.onpolicy_fraction": 0.0,
        }
        return wiring, cfg.round.rm_overrides
    reference = str(run / "sft") if cfg.round.reference == "sft" else None  # None: the policy it starts from
    wiring = {"policy": str(last / "ppo"), "reward_model": str(here / "rm"), "reference": reference}
    return wiring, cfg.round.ppo_overrides


def stage_overrides(cfg: PipelineConfig, job: Job | str) -> list[str]:
    """What the pipeline sets for a stage: where it writes, what it starts from, run names."""
    job = job if isinstance(job, Job) else Job(job, job, KINDS[job].wiring(cfg, Path(cfg.runs_dir) / cfg.name))
    run = Path(cfg.runs_dir) / cfg.name
    typed = {
        "output_dir": str(run / job.name),
        **job.wiring,
        "tracking.group": cfg.name,
        "tracking.run_name": f"{cfg.name}-{job.name.replace('/', '-')}",
    }
    # Quoted, so that the stage reads back each path and name exactly: unquoted, `runs/exp #2/rm`
    # was re-read as YAML and became `runs/exp` (a comment) for every stage.
    return [*(_override(k, v) for k, v in typed.items()), *getattr(cfg, job.kind).overrides, *job.overrides]


def _override(key: str, value) -> str:
    """key=value for a path or name (quoted: rlhf.config.schema.format_override), a list of paths
    (a flow list of quoted paths), a number or null."""
    if isinstance(value, str):
        return format_override(key, value)
    if isinstance(value, (list, tuple)):
        return f"{key}=[{', '.join(format_override('', v)[1:] for v in value)}]"
    return f"{key}={'null' if value is None else value}"


def resolved_stage_config(cfg: PipelineConfig, job: Job | str):
    kind = job.kind if isinstance(job, Job) else job
    return load_config(KINDS[kind].config_class, _path(getattr(cfg, kind).config), stage_overrides(cfg, job))


def launch_command(cfg: PipelineConfig, job: Job | str) -> list[str]:
    kind = job.kind if isinstance(job, Job) else job
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        cmd += ["--config_file", str(_path(cfg.accelerate_config))]
    if cfg.num_processes:
        cmd += ["--num_processes", str(cfg.num_processes)]
    if cfg.main_process_port:
        cmd += ["--main_process_port", str(cfg.main_process_port)]
    spec = getattr(cfg, kind)
    return [*cmd, *_stage_target(kind), "--config", str(_path(spec.config)), *stage_overrides(cfg, job)]


def _stage_target(kind: str) -> list[str]:
    """The checkout's launcher, or, where the package is installed without launch/ (pip install .),
    the same command as a module: `accelerate launch -m stages.commands <kind>`."""
    script = ROOT / KINDS[kind].script
    return [str(script)] if script.is_file() else ["-m", "stages.commands", kind]


def run(cfg: PipelineConfig, from_stage: str | None = None, only: str | None = None, dry_run: bool = False) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.name
    logs = run_dir / "logs"
    names = [j.name for j in jobs(cfg)]
    for flag, stage in (("--from-stage", from_stage), ("--only", only)):
        if stage is not None and stage not in names:
            raise ConfigError(flag, f"{stage} is not one of this pipeline's stages {names}")
    check_held_out_agree(cfg)
    selected = [only] if only else list(names[names.index(from_stage) :] if from_stage else names)
    forced = set(selected) if (only or from_stage) else set()
    upstream_ran = False
    for job in jobs(cfg):
        if job.name not in selected:
            continue
        stage_cfg = resolved_stage_config(cfg, job)
        out = Path(stage_cfg.output_dir)
        digest = content_hash(stage_cfg)
        if job.name not in forced and not upstream_ran and _finished_and_current(out, digest):
            print(f"[pipeline] {job.name}: finished output in {out} matches its config; skipped", flush=True)
            continue
        if job.name in forced and not dry_run:
            start_afresh(out)
        cmd = launch_command(cfg, job)
        print(f"[pipeline] {job.name}: {shlex.join(cmd)}", flush=True)  # as a shell would take it back
        if dry_run:
            continue
        log_name = job.name.replace("/", "-")
        logs.mkdir(parents=True, exist_ok=True)
        status = logs / f"{log_name}.exit_code"
        status.unlink(missing_ok=True)
        code = _run_logged(cmd, logs / f"{log_name}.log", {"RLHF_EXIT_STATUS_FILE": str(status.resolve())})
        if code != 0:
            if status.is_file():  # the stage's own code (accelerate launch turns every failure into 1)
                code = int(status.read_text().strip() or code)
            print(
                f"[pipeline] {job.name} failed with exit code {code}; log: {logs / f'{log_name}.log'}", file=sys.stderr
            )
            return code
        upstream_ran = True
    if dry_run:
        return 0
    print(summary_table(run_dir, cfg.stages, cfg.rounds), flush=True)
    if cfg.report:
        try:
            from rlhf.report import write_report

            print(f"[pipeline] report: {write_report(run_dir)}", flush=True)
        except Exception as e:  # the report is a convenience; the run itself succeeded
            print(f"[pipeline] report not written: {e}", file=sys.stderr)
    return 0


def start_afresh(out: Path) -> Path | None:
    """A forced re-run (--from-stage, --only) starts without the stage's checkpoints. The stage's
    lock is taken first, so that a live run on it stops the pipeline here with its checkpoints
    untouched; they are then moved aside, never deleted (they may be all a long run has left).
    Returns where they went, or None."""
    if not (out / "checkpoints").exists():
        return None
    lock_output(out)
    try:
        moved = move_aside(out / "checkpoints", "forced")
    finally:
        release_output_locks()
    print(f"[pipeline] {out.name}: a forced re-run starts afresh; its checkpoints moved aside to {moved}", flush=True)
    return moved


# The task fields that decide the held-out splits: the test split leaves the validation items out
# and every generated training set leaves the test items out, so all stages must draw the same ones.
HELD_OUT_KEYS = (
    "task.name",
    "task.eval_size",
    "task.eval_digits",
    "task.data_seed",
    "task.fewshot",
    "task.prompt_language",
    "task.test_per_bucket",
    "task.test_seed",
    "data.test",
    "data.test_split",
)


def check_held_out_agree(cfg: PipelineConfig) -> None:
    """Refuse stages that would draw different validation or test splits: one stage's test items
    could then be another's training items, and their eval.json files would quote different sets."""
    seen: dict[str, tuple[str, object]] = {}  # key -> (the first stage that set it, its value)
    for job in jobs(cfg):  # later rounds too: their label config and round.*_overrides
        stage_cfg = resolved_stage_config(cfg, job)
        for key in HELD_OUT_KEYS:
            if job.kind in ("rm", "label") and key.startswith("data."):
                continue  # the reward model reads pairs, the label stage prompts: neither reads data.test
            value = _dotted(stage_cfg, key)
            first, expected = seen.setdefault(key, (job.name, value))
            if value != expected:
                raise ConfigError(
                    f"{job.name}.{key}",
                    f"is {value!r} but {first}.{key} is {expected!r}: every stage must draw the same held-out splits",
                )


def _dotted(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _finished_and_current(out: Path, digest: str) -> bool:
    """Finished, from what the stage config names now (`content_hash`: its data files' bytes and
    its input stages' manifests, however their paths are spelled)."""
    manifest = read_manifest(out)
    return bool(manifest and manifest.get("finished") and manifest.get("config_hash") == digest)


def _run_logged(cmd: list[str], log_path: Path, extra_env: dict[str, str]) -> int:
    """Run a stage, copying its output to the console and to its log file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            log.write(chunk)
            log.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return proc.wait()


def summary_table(run_dir: Path, stages: tuple[str, ...] = ("sft", "rm", "ppo"), rounds: int = 1) -> str:
    """The key figures of each of `stages` (and of each round after the first), from their
    manifests and eval.json files."""
    lines = ["", f"Pipeline summary: {run_dir}", ""]
    rows = []

    def load(stage: str, name: str) -> dict:
        path = run_dir / stage / name
        return json.loads(path.read_text()) if path.is_file() else {}

    label, sft, rm, ppo, dpo = (load(s, "eval.json") if s in stages else {} for s in ("label", *STAGES))
    for stage in stages:
        manifest = load(stage, "manifest.json")
        wall = manifest.get("metrics", {}).get("wall_time_s")
        rows.append((stage, "wall time", f"{wall:.0f} s" if wall else "-"))
    rows += label_rows(label, "label")
    if sft:
        rows += _accuracy_rows("sft", " of the base model", sft.get("base")) + _accuracy_rows("sft", "", sft)
    if rm:
        rows.append(("rm", "pairwise accuracy", f"{rm.get('accuracy', float('nan')):.3f}"))
        if rm.get("accuracy_generated") is not None and "onpolicy" in rm.get("accuracy_by_kind", {}):
            rows.append(("rm", "  without on-policy pairs", f"{rm['accuracy_generated']:.3f}"))
        for kind, acc in rm.get("accuracy_by_kind", {}).items():
            rows.append(("rm", f"  on {kind}", f"{acc:.3f}"))
    if dpo:
        rows += _accuracy_rows("dpo", " before", dpo.get("before")) + _accuracy_rows("dpo", " after", dpo.get("after"))
        if (dpo.get("pairs") or {}).get("accuracy") is not None:
            rows.append(("dpo", "held-out pair accuracy", f"{dpo['pairs']['accuracy']:.3f}"))
    if ppo:
        rows += _accuracy_rows("ppo", " before", ppo.get("before")) + _accuracy_rows("ppo", " after", ppo.get("after"))
        rows.append(("ppo", "final KL (target)", _kl(ppo)))
        rows += proxy_gold_rows(run_dir / "ppo", ppo, "ppo")
    for k in range(2, rounds + 1):
        rows += round_rows(run_dir / f"round-{k}", f"round-{k}")
    width, stage_width = max(len(r[1]) for r in rows), max(4, *(len(r[0]) for r in rows))
    lines += [f"  {s:<{stage_width}} {k:<{width}}  {v}" for s, k, v in rows]
    if any("validation accuracy" in r[1] for r in rows):
        lines += [
            "",
            "  accuracy: the task's checker, ± one standard error; the test split is used by nothing else, the",
            "  validation split by in-loop evaluation and tuning",
        ]
    lines += [
        "",
        f"  outputs:     {run_dir}/{{{','.join(stages)}}}",
        f"  TensorBoard: tensorboard --logdir {run_dir}",
        f"  wandb:       wandb sync {run_dir}/*/wandb/offline-run-*   (offline runs)",
        f"  report:      {run_dir}/report.html",
        "",
    ]
    return "\n".join(lines)


def _accuracy_rows(stage: str, when: str, evaluation: dict | None) -> list[tuple[str, str, str]]:
    """The quoted split's accuracy (the test split's, ± one standard error), then the validation
    split's beside it (in-loop evaluation and tuning used it: not an unbiased figure)."""
    if not evaluation or "accuracy" not in evaluation:
        return []
    split = evaluation.get("split", "held-out")
    rows = [(stage, f"{split} accuracy{when}", _acc(evaluation))]
    errors = evaluation.get("stderr_by_kind", {})
    for kind, value in evaluation.get("accuracy_by_kind", {}).items():  # a task with named buckets
        rows.append((stage, f"  {kind}{when}", f"{value:.3f} ± {errors.get(kind, float('nan')):.3f}"))
    if evaluation.get("mean_words") is not None:
        rows.append((stage, f"  mean words{when}", f"{evaluation['mean_words']:.1f}"))
    if evaluation.get("validation"):
        rows.append((stage, f"  validation accuracy{when}", _acc(evaluation["validation"])))
    return rows


def round_rows(round_dir: Path, name: str) -> list[tuple[str, str, str]]:
    """A later round's lines: its comparisons, the RM's accuracy on this policy's samples before and
    after the refresh, and PPO's result."""

    def load(stage: str, file: str) -> dict:
        path = round_dir / stage / file
        return json.loads(path.read_text()) if path.is_file() else {}

    label, rm, ppo = load("label", "eval.json"), load("rm", "eval.json"), load("ppo", "eval.json")
    rows = []
    for stage in ROUND_STAGES:
        wall = load(stage, "manifest.json").get("metrics", {}).get("wall_time_s")
        rows.append((f"{name}/{stage}", "wall time", f"{wall:.0f} s" if wall else "-"))
    rows += label_rows(label, f"{name}/label")
    before, after = label.get("rm_accuracy_before"), (rm.get("accuracy_by_kind") or {}).get(name)
    if before is not None or after is not None:
        text = " -> ".join(f"{x:.3f}" if x is not None else "-" for x in (before, after))
        rows.append((f"{name}/rm", "accuracy on the policy's samples", f"{text} (before -> after)"))
    if ppo:
        rows.append((f"{name}/ppo", "accuracy before", _acc(ppo.get("before") or {})))
        rows.append((f"{name}/ppo", "accuracy after", _acc(ppo.get("after") or {})))
        rows.append((f"{name}/ppo", "final KL (target)", _kl(ppo)))
        rows += proxy_gold_rows(round_dir / "ppo", ppo, f"{name}/ppo")
    return rows


def _kl(ppo: dict) -> str:
    """The final KL and its target, or that β was fixed (no target)."""
    kl, target = ppo.get("final_kl"), ppo.get("kl_target")
    if kl is None:
        return "-"
    return f"{kl:.3f} ({target})" if target is not None else f"{kl:.3f} (fixed β, no target)"


def label_rows(label: dict, name: str) -> list[tuple[str, str, str]]:
    """A label stage's lines: its pairs, the prompts with a passing answer (best of K, the SFT data of
    rejection sampling), the share of samples the checker passes, and each labeller's agreement
    with the checker on the pairs it can decide."""
    if not label:
        return []
    train, held_out = label.get("train", {}), label.get("eval", {})

    def share(x: float | None) -> str:
        return f"{x:.3f}" if x is not None else "-"

    rows = [
        (
            name,
            f"pairs ({label.get('labeller')})",
            f"{train.get('pairs', '-')} (held out {held_out.get('pairs', '-')})",
        ),
        (name, "prompts with a passing answer", f"{train.get('best_of_k', '-')} of {train.get('prompts', '-')}"),
        (name, "samples the checker passes", share(train.get("policy_gold"))),
        (name, "labeller agrees with gold", share(train.get("gold_agreement"))),
    ]
    for key in sorted(k for k in held_out if k.endswith("_gold_agreement") and k != "gold_agreement"):
        n = held_out.get(key.replace("agreement", "decidable_pairs"))
        rows.append((name, f"{key.split('_')[0]} agrees with gold (held out)", f"{share(held_out[key])} on {n} pairs"))
    return rows


def proxy_gold_rows(ppo_dir: Path, report: dict, label: str) -> list[tuple[str, str, str]]:
    """The summary's proxy-vs-gold lines for one PPO stage: where gold peaked, which policy was
    kept (train.keep_best), and the over-optimisation warning when the proxy rose as gold fell."""
    points = run_points(ppo_dir)
    rows = []
    best = best_gold(points)
    if best is not None:
        rows.append((label, "best gold (step, KL)", f"{best.gold:.3f} (step {best.step}, KL {best.kl:.2f})"))
    if report.get("kept"):
        kept = report["kept"]
        rows.append((label, f"kept by {kept['by']}", f"step {kept['step']} ({kept['value']:.3f})"))
    warning = divergence(points)
    if warning:
        rows.append((label, "WARNING", warning))
    return rows


def _acc(report: dict) -> str:
    """E.g. 0.912 ± 0.006 (2-digit 1.000 ± 0.000, 5-digit 0.824 ± 0.012): ± one standard error."""
    if "accuracy" not in report:
        return "-"

    def pm(value: float, se: float | None) -> str:
        return f"{value:.3f} ± {se:.3f}" if se is not None else f"{value:.3f}"

    errors = report.get("stderr_by_digits", {})
    buckets = ", ".join(f"{d}-digit {pm(a, errors.get(d))}" for d, a in report.get("accuracy_by_digits", {}).items())
    head = pm(report["accuracy"], report.get("stderr"))
    return f"{head} ({buckets})" if buckets else head


def _path(p: str) -> Path:
    """A config path as given, or relative to the repository when it does not exist as given."""
    path = Path(p)
    return path if path.exists() or path.is_absolute() else ROOT / path


if __name__ == "__main__":
    sys.exit(main())
