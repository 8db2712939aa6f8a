"""The commands, one function each: the launch/ shims call them from a checkout, and the installed
console script calls them from anywhere (`pip install .` ships rlhf/ and stages/, not launch/):

    rlhf sft model=HuggingFaceTB/SmolLM2-135M-Instruct data.train=mine.jsonl output_dir=runs/me/sft
    rlhf rm | ppo | dpo | kto | orpo | cpo | label [--config FILE] [key.sub=value ...]
    rlhf pipeline [--config FILE] [key=value ...]     # also plain `rlhf [--config FILE] ...`

A stage without --config runs the generic defaults (rlhf/config: no task, your data, settings for a
pretrained model); the tiny CPU default is `--config configs/tiny/<stage>.yaml` in a checkout.
"""

from __future__ import annotations

import importlib
import sys

from rlhf.cli import run_stage
from rlhf.config import (
    CPOStageConfig,
    DPOStageConfig,
    KTOStageConfig,
    LabelStageConfig,
    ORPOStageConfig,
    PPOStageConfig,
    RMStageConfig,
    SFTStageConfig,
)
from rlhf.pipeline import main as pipeline_main

# command -> (config class, "module:function" of its recipe). The recipe is imported by name when
# its command runs: each pulls in its own trainer stack (TRL, vLLM), which the others need not load.
STAGE_COMMANDS: dict[str, tuple[type, str]] = {
    "sft": (SFTStageConfig, "stages.sft.train:train"),
    "rm": (RMStageConfig, "stages.reward.train:train"),
    "ppo": (PPOStageConfig, "stages.ppo.train:train"),
    "dpo": (DPOStageConfig, "stages.dpo.train:train"),
    "label": (LabelStageConfig, "stages.reward.label:label"),
    "kto": (KTOStageConfig, "stages.preference.kto:train"),
    "orpo": (ORPOStageConfig, "stages.preference.orpo:train"),
    "cpo": (CPOStageConfig, "stages.preference.cpo:train"),  # SimPO too: loss.type=simpo
}


def run_command(name: str, argv: list[str] | None = None) -> int:
    """Run one stage command (a STAGE_COMMANDS key) on `argv` (default: sys.argv[1:])."""
    config_class, target = STAGE_COMMANDS[name]
    module, _, function = target.partition(":")
    recipe = getattr(importlib.import_module(module), function)
    return run_stage(config_class, recipe, None, argv)


def main(argv: list[str] | None = None) -> int:
    """`rlhf <command> ...`; anything else is the pipeline's command line, as before commands existed."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STAGE_COMMANDS:
        return run_command(argv[0], argv[1:])
    if argv and argv[0] == "pipeline":
        return pipeline_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return pipeline_main(argv)


if __name__ == "__main__":  # `accelerate launch -m stages.commands sft ...` (the pipeline, installed)
    sys.exit(main())
