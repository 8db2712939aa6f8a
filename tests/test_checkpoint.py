"""Training state on disk (rlhf/checkpoint.py): which checkpoint a run resumes, and that old
checkpoints are moved aside, never deleted on a guess."""

from pathlib import Path

from rlhf.checkpoint import agreed_checkpoint, claim_checkpoints, mark_complete, move_aside, prune_checkpoints


def _complete(checkpoints: Path, step: int) -> Path:
    path = checkpoints / f"step-{step}"
    path.mkdir(parents=True)
    mark_complete(path)
    return path


def test_resume_false_moves_the_old_runs_checkpoints_aside(tmp_path):
    # Left in place, the old run's higher steps won every pruning (the new run's checkpoints were
    # deleted as soon as written) and a crash resumed the old run.
    checkpoints = tmp_path / "checkpoints"
    claim_checkpoints(checkpoints, "abc")
    for step in (10, 20):
        _complete(checkpoints, step)
    assert agreed_checkpoint(checkpoints, "abc", resume=False, is_main_process=True) is None
    (aside,) = tmp_path.glob("checkpoints.not-resumed-*")
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-10", "step-20"]
    new = _complete(checkpoints, 1)
    prune_checkpoints(checkpoints, keep=1)
    assert new.is_dir()
    assert agreed_checkpoint(checkpoints, "abc", resume=True, is_main_process=True) == new
    # with resume and nothing else changed, the checkpoints stay where they are
    assert len(list(tmp_path.glob("checkpoints.*"))) == 1


def test_move_aside_never_overwrites_an_earlier_move(tmp_path):
    first = tmp_path / "checkpoints"
    first.mkdir()
    (first / "a").write_text("1")
    one = move_aside(first, "forced")
    first.mkdir()
    (first / "a").write_text("2")
    two = move_aside(first, "forced")
    assert one != two and (one / "a").read_text() == "1" and (two / "a").read_text() == "2"
    assert move_aside(first, "forced") is None


def test_content_hash_follows_what_paths_hold_not_how_they_are_written(tmp_path, monkeypatch):
    # A data file entered the hash by its path: new lines in it left the output "current", and the
    # same run addressed by an absolute runs_dir from another directory re-trained from scratch.
    from rlhf.checkpoint import content_hash, write_manifest
    from rlhf.config import RMStageConfig, load_config

    monkeypatch.chdir(tmp_path)
    sft = tmp_path / "runs" / "x" / "sft"
    sft.mkdir(parents=True)
    finished = {"stage": "sft", "model": "tiny", "base_model": "tiny", "init_from": None, "lora": False}
    write_manifest(sft, **finished, config_hash="a", metrics={"loss": 1.0})
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "1-1=", "chosen": "0", "rejected": "1"}\n')

    def digest(model: str, pairs: str) -> str:
        return content_hash(load_config(RMStageConfig, None, [f"model={model}", f"data.train={pairs}"]))

    relative = digest("runs/x/sft", "pairs.jsonl")
    assert digest(str(sft), str(tmp_path / "pairs.jsonl")) == relative
    assert digest(f"{tmp_path}/../{tmp_path.name}/runs/x/sft", "./pairs.jsonl") == relative
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "2-1=", "chosen": "1", "rejected": "0"}\n')
    changed_data = digest("runs/x/sft", "pairs.jsonl")
    assert changed_data != relative
    write_manifest(sft, **finished, config_hash="a", metrics={"loss": 0.5})  # re-trained, same config
    assert digest("runs/x/sft", "pairs.jsonl") != changed_data
