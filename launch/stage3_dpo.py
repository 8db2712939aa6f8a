"""Stage 3, DPO: the other road from SFT (no reward model, no PPO).

accelerate launch launch/stage3_dpo.py --config configs/tiny/dpo.yaml policy=runs/x/sft output_dir=runs/x/dpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("dpo"))  # the same as `rlhf dpo ...`; no --config: the generic defaults
