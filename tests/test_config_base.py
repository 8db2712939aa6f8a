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

from rlhf.config import load_config, to_dict
from test_config import ROOT, our_yamls, stage_class

FIXTURE = ROOT / "tests/fixtures/resolved_configs.json"


def resolved(path: Path) -> dict:
    # through JSON, as the fixture was written: tuples become lists
    return json.loads(json.dumps(to_dict(load_config(stage_class(path), path))))


@pytest.mark.parametrize("name", sorted(json.loads(FIXTURE.read_text(encoding="utf-8"))))
def test_every_captured_config_resolves_exactly_as_before(name):
    expected = json.loads(FIXTURE.read_text(encoding="utf-8"))[name]
    assert resolved(ROOT / "configs" / name) == expected


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    captured = {str(p.relative_to(ROOT / "configs")): resolved(p) for p in our_yamls()}
    FIXTURE.write_text(json.dumps(captured, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(captured)} configs to {FIXTURE}")
