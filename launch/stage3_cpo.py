"""Stage 3, CPO or SimPO (loss.type: simpo): reference-free preference losses (TRL experimental).

accelerate launch launch/stage3_cpo.py --config configs/tiny/simpo.yaml policy=runs/x/sft output_dir=runs/x/simpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import run_stage
from rlhf.config import CPOStageConfig
from stages.preference.cpo import train

if __name__ == "__main__":
    sys.exit(run_stage(CPOStageConfig, train, str(Path(__file__).resolve().parents[1] / "configs/tiny/simpo.yaml")))
