"""Configs that inherit (`base:`): every YAML under configs/ resolves to exactly the config it
resolved to as a standalone copy (tests/fixtures/resolved_configs.json, captured from main before
the variants were rewritten as differences), and `base:` merges, lists, refuses cycles and
missing files, and lets the file's own keys and then the command line win.

A deliberate change to a config's resolved values: regenerate the fixture with
`PYTHONPATH=$PWD python tests/test_config_base.py --update` and review its diff."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from test_config import ROOT, our_yamls, stage_class

from rlhf.cli import parse
from rlhf.config import ConfigError, SFTStageConfig, dump_yaml, load_config, to_dict
from rlhf.pipeline import load_pipeline

FIXTURE = ROOT / "tests/fixtures/resolved_configs.json"


def resolved(path: Path) -> dict:
    # through JSON, as the fixture was written: tuples become lists
    return json.loads(json.dumps(to_dict(load_config(stage_class(path), path))))


@pytest.mark.parametrize("name", sorted(json.loads(FIXTURE.read_text(encoding="utf-8"))))
def test_every_captured_config_resolves_exactly_as_before(name):
    expected = json.loads(FIXTURE.read_text(encoding="utf-8"))[name]
    assert resolved(ROOT / "configs" / name) == expected


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_base_deep_merges_and_the_files_own_keys_win(tmp_path):
    write(tmp_path, "base.yaml", "seed: 3\ntrain:\n  max_steps: 10\n  batch_size: 4\noptim:\n  lr: 0.01\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 20\n")
    cfg = load_config(SFTStageConfig, path)
    # train.max_steps from the child; train.batch_size kept from the base's train: section (deep merge)
    assert (cfg.seed, cfg.train.max_steps, cfg.train.batch_size, cfg.optim.lr) == (3, 20, 4, 0.01)


def test_a_list_of_bases_merges_in_order_later_wins_and_paths_are_relative_to_the_file(tmp_path):
    write(tmp_path, "common/a.yaml", "seed: 1\ntrain:\n  max_steps: 10\n  batch_size: 4\n")
    write(tmp_path, "common/b.yaml", "seed: 2\ntrain:\n  max_steps: 30\n")
    path = write(tmp_path, "x/child.yaml", "base: [../common/a.yaml, ../common/b.yaml]\ntrain:\n  grad_accum: 2\n")
    cfg = load_config(SFTStageConfig, path)
    assert (cfg.seed, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (2, 30, 4, 2)


def test_bases_chain_and_a_list_replaces_not_appends(tmp_path):
    write(tmp_path, "a.yaml", "task:\n  eval_digits: [1, 2, 3]\nseed: 1\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nseed: 2\n")
    path = write(tmp_path, "c.yaml", "base: b.yaml\ntask:\n  eval_digits: [4]\n")
    cfg = load_config(SFTStageConfig, path)
    assert cfg.seed == 2 and cfg.task.eval_digits == (4,)


def test_command_line_overrides_apply_after_every_base(tmp_path):
    write(tmp_path, "base.yaml", "seed: 3\ntrain:\n  max_steps: 10\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 20\n")
    cfg = load_config(SFTStageConfig, path, ["train.max_steps=7", "seed=5"])
    assert (cfg.seed, cfg.train.max_steps) == (5, 7)
    # and through a stage's own command line (launch/stage*.py): --config, then the overrides
    cfg, _ = parse(SFTStageConfig, None, ["--config", str(path), "seed=6"])
    assert (cfg.seed, cfg.train.max_steps) == (6, 20)


def test_base_on_the_command_line_is_refused_not_read_as_an_unknown_key(tmp_path):
    path = write(tmp_path, "c.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match="config key 'base': names a YAML's bases inside the file"):
        load_config(SFTStageConfig, path, ["base=other.yaml"])


def test_a_cycle_is_one_line_naming_the_chain(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: c.yaml\n")
    write(tmp_path, "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, tmp_path / "a.yaml")
    message = str(err.value)
    assert "\n" not in message and err.value.key == "base"
    chain = " -> ".join(str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml", "a.yaml"))
    assert f"cycle: {chain}" in message


def test_a_file_naming_itself_as_its_base_is_a_cycle(tmp_path):
    path = write(tmp_path, "a.yaml", "base: ./a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(SFTStageConfig, path)


def test_the_same_base_twice_is_not_a_cycle(tmp_path):
    write(tmp_path, "common.yaml", "seed: 4\n")
    write(tmp_path, "a.yaml", "base: common.yaml\n")
    path = write(tmp_path, "b.yaml", "base: [common.yaml, a.yaml]\n")
    assert load_config(SFTStageConfig, path).seed == 4


def test_a_missing_base_is_one_line_naming_it_and_the_file_that_names_it(tmp_path):
    path = write(tmp_path, "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, path)
    assert str(err.value) == f"{path}: config key 'base': base file {tmp_path / 'nowhere.yaml'} not found"


def test_base_must_be_a_path_or_a_list_of_paths(tmp_path):
    path = write(tmp_path, "child.yaml", "base: {a: 1}\n")
    with pytest.raises(ConfigError, match="'base': must be a path or a list of paths"):
        load_config(SFTStageConfig, path)


def test_an_unknown_key_in_a_base_names_the_base_and_keeps_did_you_mean(tmp_path):
    base = write(tmp_path, "base.yaml", "train:\n  batchsize: 4\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, path)
    assert str(err.value).startswith(
        f"{base} (a base of {path}): config key 'train.batchsize': unknown key; did you mean 'train.batch_size'"
    )


def test_an_unknown_key_in_the_file_itself_names_the_file(tmp_path):
    write(tmp_path, "base.yaml", "seed: 1\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'train.batchsize': unknown key; did you mean"):
        load_config(SFTStageConfig, path)


def test_a_bad_value_from_a_base_names_the_base_unless_the_command_line_set_it(tmp_path):
    base = write(tmp_path, "base.yaml", "train:\n  max_steps: many\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{base} \(a base of {path}\): config key 'train.max_steps'"):
        load_config(SFTStageConfig, path)
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'train.max_steps'"):
        load_config(SFTStageConfig, path, ["train.max_steps=lots"])


def test_the_pipeline_config_inherits_too(tmp_path):
    write(tmp_path, "base.yaml", f"base: {ROOT / 'configs/tiny/pipeline_rm.yaml'}\nname: shared\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\nrounds: 2\n")
    cfg = load_pipeline(str(path), ["name=mine", "sft.train.max_steps=3"])
    stock = load_pipeline(str(ROOT / "configs/tiny/pipeline_rm.yaml"), [])
    assert (cfg.name, cfg.rounds, cfg.sft.overrides[-1]) == ("mine", 2, "train.max_steps=3")
    assert cfg.stages == stock.stages


def test_the_resolved_config_written_to_a_run_holds_no_base_and_reloads_equal(tmp_path):
    write(tmp_path, "base.yaml", "seed: 3\ntrain:\n  max_steps: 10\n")
    path = write(tmp_path, "child.yaml", "base: base.yaml\ntrain:\n  max_steps: 20\n")
    cfg = load_config(SFTStageConfig, path)
    text = dump_yaml(cfg)
    assert "base" not in yaml.safe_load(text)
    assert load_config(SFTStageConfig, write(tmp_path, "resolved.yaml", text)) == cfg


def test_every_fragment_is_a_base_and_says_so():
    """`configs/**/_*.yaml` hold what several configs share (e.g. a pipeline's task); each is named
    in some config's `base:`, and its header says who uses it."""
    fragments = sorted((ROOT / "configs").rglob("_*.yaml"))
    assert fragments
    named = set()
    for path in our_yamls():
        bases = yaml.safe_load(path.read_text(encoding="utf-8")).get("base") or []
        named |= {(path.parent / b).resolve() for b in ([bases] if isinstance(bases, str) else bases)}
    for fragment in fragments:
        assert fragment.resolve() in named, f"{fragment} is no config's base"
        assert fragment.read_text(encoding="utf-8").startswith("# "), fragment


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    captured = {str(p.relative_to(ROOT / "configs")): resolved(p) for p in our_yamls()}
    FIXTURE.write_text(json.dumps(captured, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(captured)} configs to {FIXTURE}")
