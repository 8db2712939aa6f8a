"""An RLHF round's comparisons: the policy's samples on fresh prompts, labelled, as stage-2 pairs.

accelerate launch launch/stage2_label.py --config configs/tiny/label.yaml \
    policy=runs/x/ppo reward_model=runs/x/rm output_dir=runs/x/round-2/label
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("label"))  # the same as `rlhf label ...`; no --config: the generic defaults
