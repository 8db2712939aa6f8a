"""Stage 3, ORPO: SFT and preference learning in one loss, no reference model (TRL experimental).

accelerate launch launch/stage3_orpo.py --config configs/tiny/orpo.yaml policy=runs/x/sft output_dir=runs/x/orpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import run_stage
from rlhf.config import ORPOStageConfig
from stages.preference.orpo import train

if __name__ == "__main__":
    sys.exit(run_stage(ORPOStageConfig, train, str(Path(__file__).resolve().parents[1] / "configs/tiny/orpo.yaml")))
