"""Stage 1, supervised fine-tuning.

accelerate launch launch/stage1_sft.py --config configs/tiny/sft.yaml output_dir=runs/x/sft
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import run_stage
from rlhf.config import SFTStageConfig
from stages.sft.train import train

if __name__ == "__main__":
    sys.exit(run_stage(SFTStageConfig, train, str(Path(__file__).resolve().parents[1] / "configs/tiny/sft.yaml")))
