"""Stage 2, the reward model.

accelerate launch launch/stage2_rm.py --config configs/tiny/rm.yaml model=runs/x/sft output_dir=runs/x/rm
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("rm"))  # the same as `rlhf rm ...`; no --config: the generic defaults
