"""Stage 1, supervised fine-tuning.

accelerate launch launch/stage1_sft.py --config configs/tiny/sft.yaml output_dir=runs/x/sft
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("sft"))  # the same as `rlhf sft ...`; no --config: the generic defaults
