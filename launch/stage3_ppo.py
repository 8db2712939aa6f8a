"""Stage 3, PPO.

accelerate launch launch/stage3_ppo.py --config configs/tiny/ppo.yaml \
    policy=runs/x/sft reward_model=runs/x/rm output_dir=runs/x/ppo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("ppo"))  # the same as `rlhf ppo ...`; no --config: the generic defaults
