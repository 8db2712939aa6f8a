"""Stage 2, the reward model.

accelerate launch launch/stage2_rm.py --config configs/tiny/rm.yaml model=runs/x/sft output_dir=runs/x/rm
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import run_stage
from rlhf.config import RMStageConfig
from stages.reward.train import train

if __name__ == "__main__":
    sys.exit(run_stage(RMStageConfig, train, str(Path(__file__).resolve().parents[1] / "configs/tiny/rm.yaml")))
