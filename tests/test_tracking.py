"""Trackers (rlhf/tracking.py): which trackers `tracking.report_to` may name, a stored `wandb login`
counting as logged in, a tracker whose package is missing dropped with the pip line, and MLflow
logging for real to a local file store. No network anywhere."""

import warnings
from pathlib import Path
from typing import ClassVar

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from wandb.sdk import wandb_setup

import rlhf.tracking as tracking
from rlhf.config import TRACKERS, ConfigError, SFTStageConfig, TrackingConfig, load_config
from rlhf.tracking import Tracking, wandb_logged_in

# 40 characters: wandb refuses a shorter key as malformed (wandb/sdk/lib/wbauth/validation.py)
KEY = "0123456789abcdef0123456789abcdef01234567"
WANDB_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE")


def test_the_trackers_are_accelerates_and_all_of_them():
    # a name here that accelerate lacks could never start; one accelerate added is not selectable yet
    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


def test_an_unknown_tracker_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(SFTStageConfig, None, ["tracking.report_to=[tensorboard, mlfow]"])
    assert str(e.value) == (
        "config key 'tracking.report_to': unknown tracker 'mlfow'; known: tensorboard, wandb, mlflow, "
        "comet_ml, aim, clearml, dvclive, swanlab, trackio"
    )
    cfg = load_config(SFTStageConfig, None, ["tracking.report_to=[mlflow, aim]"])
    assert cfg.tracking.report_to == ("mlflow", "aim")


def test_a_tracker_whose_package_is_missing_is_dropped_naming_the_pip_install(tmp_path, monkeypatch):
    # comet_ml is not installed here; accelerate says so, and the run goes on with metrics.jsonl
    monkeypatch.setattr(tracking, "_installed", lambda name: name != "comet_ml")
    with pytest.warns(UserWarning, match=r"comet_ml tracking disabled: not installed \(pip install comet-ml\)"):
        run = Tracking(TrackingConfig(report_to=("comet_ml",)), tmp_path, "sft", {})
    assert run.names == ["jsonl"]
    run.finish()


def test_a_tracker_that_refuses_to_start_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch):
    def refuse(name, *args):
        raise ValueError("no API key")  # as a constructor that reads its settings would

    monkeypatch.setattr(tracking, "_installed", lambda name: True)
    monkeypatch.setattr(tracking, "_accelerate_tracker", refuse)
    with pytest.warns(UserWarning, match="aim tracking disabled: no API key"):
        run = Tracking(TrackingConfig(report_to=("aim",)), tmp_path, "sft", {})
    assert run.names == ["jsonl"]
    run.finish()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of its own, no wandb credentials in the environment, and wandb's settings read afresh
    (wandb keeps them in a per-process singleton, restored after the test)."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    forget_wandb_settings(monkeypatch)
    return tmp_path


def forget_wandb_settings(monkeypatch) -> None:
    monkeypatch.setattr(wandb_setup, "_singleton", None)


def write_netrc(home: Path, machine: str) -> None:
    netrc = home / ".netrc"
    netrc.write_text(f"machine {machine}\n  login user\n  password {KEY}\n", encoding="utf-8")
    netrc.chmod(0o600)  # as `wandb login` leaves it; Python's netrc refuses a readable one with a password


class RecordingWandB:
    """WandBTracker's stand-in: records the mode each attempt asked for, and never reaches the network
    (an online start fails, as it does offline, so the run falls back to an offline one)."""

    name = "wandb"
    modes: ClassVar[list[str]] = []

    def __init__(self, project, **kwargs):
        self.mode = kwargs["mode"]
        RecordingWandB.modes.append(self.mode)

    def start(self):
        if self.mode == "online":
            raise RuntimeError("no network here")

    def store_init_configuration(self, values):
        pass

    def finish(self):
        pass


def modes_tried(out: Path, monkeypatch) -> list[str]:
    RecordingWandB.modes = []
    monkeypatch.setattr(tracking, "WandBTracker", RecordingWandB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed online start's warning
        Tracking(TrackingConfig(report_to=("wandb",)), out, "sft", {}).finish()
    return RecordingWandB.modes


def test_a_stored_wandb_login_runs_online(home, monkeypatch):
    assert not wandb_logged_in() and modes_tried(home / "a", monkeypatch) == ["offline"]
    write_netrc(home, "api.wandb.ai")  # what `wandb login` writes
    assert wandb_logged_in()
    assert modes_tried(home / "b", monkeypatch) == ["online", "offline"]  # online first, offline if it fails


def test_a_login_for_another_server_or_the_environment_key(home, monkeypatch):
    write_netrc(home, "wandb.example.com")
    assert not wandb_logged_in()  # the default server has no key
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    forget_wandb_settings(monkeypatch)
    assert wandb_logged_in()  # the configured server has one
    monkeypatch.delenv("WANDB_BASE_URL")
    forget_wandb_settings(monkeypatch)
    assert not wandb_logged_in()
    # `wandb login --host https://wandb.example.com` saves the host in wandb's settings file
    (home / ".config/wandb").mkdir(parents=True)
    (home / ".config/wandb/settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    forget_wandb_settings(monkeypatch)
    assert wandb_logged_in()
    (home / ".netrc").unlink()
    forget_wandb_settings(monkeypatch)
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_logged_in()


def test_the_netrc_reader_for_a_wandb_without_wbauth(home):
    assert not tracking._netrc_has_key("https://api.wandb.ai")
    write_netrc(home, "api.wandb.ai")
    assert tracking._netrc_has_key("https://api.wandb.ai")
    assert not tracking._netrc_has_key("https://wandb.example.com")


def test_mlflow_logs_metrics_to_a_local_store_and_they_read_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 prefers a database; a folder is enough here
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    cfg = TrackingConfig(report_to=("mlflow",), project="mine", run_name="try-sft")
    run = Tracking(cfg, tmp_path / "out", "sft", {"optim": {"lr": 0.001}, "seed": 3})
    assert run.names == ["jsonl", "mlflow"]
    run.log({"train/sft/loss": 1.5, "train/sft/lr": 0.001}, step=1)
    run.log({"train/sft/loss": 1.25, "train/sft/lr": 0.0005}, step=2)
    run.log_table("samples", ["prompt", "response"], [["a", "b"]], step=2)  # mlflow has no tables: skipped
    run.finish()

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mine")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "try-sft" and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/sft/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    assert found.data.params["seed"] == "3"
