"""Outputs the hub expects: every stage's README.md model card holds the run's base model, data,
method, figures and command; pushing to the hub is refused with one line when the hub cannot be
reached, before anything loads, and leaves the training checkpoints out."""

import pytest

from conftest import ROOT, run_entry
from rlhf import hub as hub_module
from rlhf.checkpoint import finish_stage, read_manifest, start_stage
from rlhf.config import ConfigError, DPOStageConfig, HubConfig, load_config
from rlhf.hub import HubError, check_hub, push_output
from rlhf.model_card import launch_command, model_card

REPORT = {  # the shape of a DPO eval.json
    "split": "test",
    "before": {"split": "test", "accuracy": 0.6125, "stderr": 0.0109, "accuracy_by_digits": {"2": 0.98, "5": 0.245}},
    "after": {"split": "test", "accuracy": 0.6542, "stderr": 0.0106, "accuracy_by_digits": {"2": 0.985, "5": 0.3234}},
    "changed": {"2": {"n": 1000}},
    "pairs": {"loss": 0.4187, "accuracy": 0.862, "margin": 1.9311},
    "accuracy_gain": 0.0417,
    "test_source": "task:subtraction/test",
}


def test_the_card_holds_base_model_data_method_figures_and_command(tmp_path):
    cfg = load_config(DPOStageConfig, ROOT / "configs/tiny/dpo.yaml", [f"output_dir={tmp_path}"])
    start_stage(tmp_path, cfg, True)
    finish_stage(
        tmp_path,
        cfg,
        stage="dpo",
        model="runs/x/sft",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        inputs=(),
        metrics={"train_loss": 0.51234},
        started=0.0,
        eval_report=REPORT,
        extra={"data": {"train": "pairs.jsonl (prompt)", "eval": "task:subtraction/eval"}},
    )
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "Direct Preference Optimization" in card and "`runs/x/sft`" in card
    assert "| data (train) | `pairs.jsonl (prompt)` |" in card
    assert "| before | test | 0.6125 ± 0.0109 | 2-digit: 0.980, 5-digit: 0.245 |" in card
    assert "| after | test | 0.6542 ± 0.0106 |" in card
    assert "| this model | 0.862 | 0.4187 | 1.9311 |" in card  # the held-out pairs: accuracy, loss, margin
    assert "| accuracy_gain | 0.0417 |" in card and "| train_loss | 0.5123 |" in card
    assert launch_command() in card
    assert not list(tmp_path.glob(".README.md.tmp*"))  # written aside and renamed


def test_the_cards_config_hash_is_the_manifests(tmp_path):
    # a config naming a data file: the manifest hashes what the file holds (content_hash), and the
    # card, which once hashed the path as written, must quote the same value
    data = ROOT / "data/examples/pairs_prompt.jsonl"
    cfg = load_config(DPOStageConfig, ROOT / "configs/tiny/dpo.yaml", [f"output_dir={tmp_path}", f"data.train={data}"])
    start_stage(tmp_path, cfg, True)
    finish_stage(tmp_path, cfg, stage="dpo", model="tiny", base_model="tiny", inputs=(), metrics={}, started=0.0)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"(hash `{read_manifest(tmp_path)['config_hash']}`)" in card


def test_the_command_is_the_one_typed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch_command(["launch/stage3_kto.py", "policy=runs/a b/sft"]) == (
        "python launch/stage3_kto.py 'policy=runs/a b/sft'"
    )
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_command(["launch/stage1_sft.py"]) == "accelerate launch launch/stage1_sft.py"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_command(["launch/stage1_sft.py"]) == "accelerate launch --num_processes 4 launch/stage1_sft.py"


@pytest.mark.slow  # launches a stage
def test_push_offline_is_refused_with_one_line_before_anything_loads(tmp_path):
    out = tmp_path / "dpo"
    result = run_entry(
        "launch/stage3_dpo.py",
        "policy=tiny-llama",
        f"output_dir={out}",
        "hub.push_to_hub=true",
        "hub.model_id=me/tiny-dpo",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: hub.push_to_hub: the Hugging Face Hub is unreachable (HF_HUB_OFFLINE=1); "
        "unset HF_HUB_OFFLINE or set hub.push_to_hub=false"
    )
    assert not out.exists()


def test_no_network_is_refused(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(HubError, match=r"^hub.push_to_hub: the Hugging Face Hub is unreachable \(127.0.0.1:9: "):
        check_hub(HubConfig(push_to_hub=True, model_id="me/x"))
    check_hub(HubConfig())  # no push asked: nothing checked


@pytest.mark.parametrize(
    "overrides, key",
    [(["hub.push_to_hub=true"], "hub.model_id"), (["hub.model_id=just-a-name"], "hub.model_id")],
)
def test_hub_settings_are_checked_at_load(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(DPOStageConfig, ROOT / "configs/tiny/dpo.yaml", overrides)
    assert e.value.key == key


def test_the_push_leaves_the_checkpoints_out(monkeypatch, tmp_path):
    calls = {}

    class FakeApi:
        def __init__(self, endpoint):
            calls["endpoint"] = endpoint

        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs
            raise OSError("connection reset")

    monkeypatch.setattr(hub_module, "HfApi", FakeApi)
    with pytest.raises(HubError, match=r"push to me/x failed \(connection reset\); the output is complete in "):
        push_output(tmp_path, HubConfig(push_to_hub=True, model_id="me/x"), stage="dpo")
    assert calls["repo"] == ("me/x", True, True)
    assert calls["upload"]["folder_path"] == str(tmp_path) and "checkpoints/*" in calls["upload"]["ignore_patterns"]


def test_missing_figures_leave_blanks_not_a_failed_stage():
    # a stage without a task reports accuracy null; the card must still be written at the stage's end
    report = {"after": {"accuracy": None, "accuracy_by_digits": {"2": None}}, "pairs": {"before": None, "after": {}}}
    card = model_card(
        stage="kto", model="m", base_model="tiny", metrics={"train_loss": None}, eval_report=report,
        data=None, command="python launch/stage3_kto.py", config_hash="h",
    )  # fmt: skip
    assert "| after |  |  |  |" in card and "python launch/stage3_kto.py" in card
