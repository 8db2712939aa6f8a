"""Stage 3, DPO: the other road from SFT (no reward model, no PPO).

accelerate launch launch/stage3_dpo.py --config configs/tiny/dpo.yaml policy=runs/x/sft output_dir=runs/x/dpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import run_stage
from rlhf.config import DPOStageConfig
from stages.dpo.train import train

if __name__ == "__main__":
    sys.exit(run_stage(DPOStageConfig, train, str(Path(__file__).resolve().parents[1] / "configs/tiny/dpo.yaml")))
