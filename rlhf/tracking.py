"""Metrics to wandb, TensorBoard and `metrics.jsonl`, through accelerate's tracker classes.

Everything lands under the stage's output directory: `metrics.jsonl` (always), `tensorboard/`,
and `wandb/` (offline runs unless WANDB_API_KEY is set; sync them later with `wandb sync`).
A tracker that fails to start (no network, no wandb) is dropped with a warning: tracking never
fails a run. Only the main process logs.

Metric keys follow one scheme across stages: `train/<stage>/<name>` and `eval/<stage>/<name>`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from rlhf.config import TrackingConfig

log = logging.getLogger(__name__)


class JSONLTracker(GeneralTracker):
    """One JSON object per log call: {"step": …, "time": …, <metric>: …}; tables as {"table": …}."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_mid_line(self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if torn:  # a kill mid-record: end that line, or the resumed run's first record is glued to it
            self.file.write("\n")

    @property
    def tracker(self):
        return self.file

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is written to config.yaml by the stage

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def log_table(self, table_name: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        record = {"step": step, "time": round(time.time(), 3), "table": table_name, "columns": columns, "rows": data}
        self.file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


class Tracking:
    """The trackers of one stage run. `log` and `log_table` are no-ops off the main process."""

    def __init__(
        self,
        cfg: TrackingConfig,
        output_dir: str | Path,
        stage: str,
        config: dict,
        is_main_process: bool = True,
        fresh: bool = False,
    ):
        """`fresh`: the stage starts afresh (no checkpoint to resume), so the metrics.jsonl and
        TensorBoard events an earlier run left in `output_dir` are removed, and the report and the
        dashboards show this run alone; a resumed run keeps and extends them."""
        self.stage = stage
        self.trackers: list[GeneralTracker] = []
        if not is_main_process:
            return
        _OPEN.append(self)
        output_dir = Path(output_dir)
        if fresh:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)
        run_name = cfg.run_name or f"{output_dir.parent.name}-{stage}"
        self.trackers.append(JSONLTracker(run_name, output_dir))
        if "tensorboard" in cfg.report_to:
            self._start(TensorBoardTracker(run_name, output_dir / "tensorboard"), config)
        if "wandb" in cfg.report_to and cfg.wandb_mode != "disabled":
            self._start_wandb(cfg, run_name, output_dir, config)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if v is not None}
        for tracker in self.trackers:
            try:
                tracker.log(finite, step=step)
            except Exception as e:  # a dashboard hiccup must not kill training
                warnings.warn(f"tracker {tracker.name} failed to log at step {step}: {e}", stacklevel=2)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for tracker in self.trackers:
            try:
                if tracker.name == "tensorboard":
                    tracker.writer.add_text(name, _markdown_table(columns, rows), global_step=step)
                else:
                    tracker.log_table(name, columns=columns, data=rows, step=step)
            except Exception as e:
                warnings.warn(f"tracker {tracker.name} failed to log table {name}: {e}", stacklevel=2)

    def finish(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as e:
                warnings.warn(f"tracker {tracker.name} failed to finish: {e}", stacklevel=2)
        self.trackers = []
        if self in _OPEN:
            _OPEN.remove(self)

    def _start(self, tracker: GeneralTracker, config: dict) -> bool:
        try:
            tracker.start()
            if tracker.name == "tensorboard":
                tracker.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
            else:
                tracker.store_init_configuration(config)
        except Exception as e:
            warnings.warn(f"{tracker.name} tracking disabled: {e}", stacklevel=3)
            return False
        self.trackers.append(tracker)
        return True

    def _start_wandb(self, cfg: TrackingConfig, run_name: str, output_dir: Path, config: dict) -> None:
        mode = cfg.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            tracker = WandBTracker(
                cfg.project,  # accelerate passes its first argument to wandb as the project
                name=run_name,
                group=cfg.group,
                job_type=self.stage,
                dir=str(output_dir),
                mode=attempt,
                config=config,
                settings=_wandb_settings(),
            )
            if self._start(tracker, config):
                return


_OPEN: list[Tracking] = []  # started and not finished: ended by `finish_open_trackers` on any exit


def finish_open_trackers() -> None:
    """End every tracker still open (a stage that raised): files flushed, wandb runs closed."""
    for tracking in list(_OPEN):
        tracking.finish()


def _wandb_settings():
    try:
        import wandb

        return wandb.Settings(init_timeout=60, console="off")
    except Exception:
        return None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metrics(path: str | Path) -> list[dict]:
    """The scalar records of a metrics.jsonl (tables skipped)."""
    return [rec for rec in metrics_records(path) if "table" not in rec]


def metrics_records(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl, tables included. A line that is not a whole JSON object
    (the process was killed while writing it) is skipped with a warning: one torn record must
    not stop the summary or the report of a run that finished."""
    out, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
    if torn:
        logging.getLogger("rlhf").warning("%s: %d torn line(s) skipped", path, torn)
    return out
