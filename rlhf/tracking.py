"""Metrics to wandb, TensorBoard and `metrics.jsonl`, through accelerate's tracker classes.

Everything lands under the stage's output directory: `metrics.jsonl` (always), `tensorboard/`,
and `wandb/` (online when wandb has a key without asking: WANDB_API_KEY or a stored `wandb login`;
offline otherwise, to sync later with `wandb sync`). Any other tracker accelerate has (mlflow,
comet_ml, aim, ...: rlhf.config.TRACKERS) is started by its accelerate class and writes where its
own settings say (MLflow: MLFLOW_TRACKING_URI). A tracker whose package is missing, or that fails to
start (no network), is dropped with a warning: tracking never fails a run. Only the main process logs.

Metric keys follow one scheme across stages: `train/<stage>/<name>` and `eval/<stage>/<name>`.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from accelerate.tracking import (
    LOGGER_TYPE_TO_CLASS,
    GeneralTracker,
    TensorBoardTracker,
    WandBTracker,
    get_available_trackers,
)

from rlhf.config import TRACKERS, TrackingConfig

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
        for name in dict.fromkeys(cfg.report_to):  # in order, once each
            if not _installed(name):
                warnings.warn(f"{name} tracking disabled: not installed (pip install {TRACKERS[name]})", stacklevel=2)
            elif name == "tensorboard":
                self._start(TensorBoardTracker(run_name, output_dir / "tensorboard"), config)
            elif name == "wandb":
                if cfg.wandb_mode != "disabled":
                    self._start_wandb(cfg, run_name, output_dir, config)
            else:
                self._start_other(name, cfg.project, run_name, output_dir, config)

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
                elif hasattr(tracker, "log_table"):  # mlflow, aim, ... have none: scalars only
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

    def _start_other(self, name: str, project: str, run_name: str, output_dir: Path, config: dict) -> None:
        try:
            tracker = _accelerate_tracker(name, project, run_name, output_dir)
        except Exception as e:  # a constructor may read its settings (an API key, a server) and refuse
            warnings.warn(f"{name} tracking disabled: {e}", stacklevel=3)
            return
        self._start(tracker, config)

    def _start_wandb(self, cfg: TrackingConfig, run_name: str, output_dir: Path, config: dict) -> None:
        mode = cfg.wandb_mode
        if mode == "auto":
            mode = "online" if wandb_logged_in() else "offline"
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


def _installed(name: str) -> bool:
    """Whether accelerate finds the tracker's package (its `is_<name>_available`, read at import)."""
    return name in {str(t) for t in get_available_trackers()}


def _accelerate_tracker(name: str, project: str, run_name: str, output_dir: Path) -> GeneralTracker:
    """accelerate's tracker `name`, built as `Accelerator.init_trackers` builds it: the project first,
    then the logging directory for the trackers that keep files (aim: <output_dir>/aim)."""
    cls = LOGGER_TYPE_TO_CLASS[name]
    if cls.requires_logging_directory:
        return cls(project, output_dir / name)
    if name == "mlflow":  # the project is mlflow's experiment; the run is named as the others are
        return cls(project, run_name=run_name)
    if name == "dvclive":  # its files beside the others, not in the working directory
        return cls(run_name, dir=str(output_dir / "dvclive"))
    return cls(project)


def wandb_logged_in() -> bool:
    """Whether wandb has a key without asking, found as wandb's own CLI finds it (`_configured_api_key`
    in wandb/cli/cli.py) and without the network: WANDB_API_KEY (or an identity-token file), a key in
    wandb's settings, else the entry for the server (WANDB_BASE_URL, or the host `wandb login --host`
    saved in ~/.config/wandb/settings) in the netrc file that `wandb login` writes (~/.netrc, $NETRC)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # imported here: `import wandb` takes seconds, and only a wandb run needs it
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import read_netrc_auth
    except ImportError:  # a wandb before wbauth (0.2x): its netrc entry by the standard library
        return _netrc_has_key(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        settings = wandb_setup.singleton().settings  # its files and environment; starts no service
        return bool(settings.api_key or read_netrc_auth(host=settings.base_url))
    except Exception as e:  # a malformed key or host: wandb would refuse it too
        warnings.warn(f"wandb: stored login not usable ({e}); running offline", stacklevel=2)
        return False


def _netrc_has_key(base_url: str) -> bool:
    """The stored key for `base_url`'s host in the netrc file, for a wandb without `wbauth`."""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        creds = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


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
