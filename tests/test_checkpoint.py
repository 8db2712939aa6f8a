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
