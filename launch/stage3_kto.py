"""Stage 3, KTO: unpaired thumbs-up/down data (or pairs), against the frozen SFT model.

accelerate launch launch/stage3_kto.py --config configs/tiny/kto.yaml policy=runs/x/sft output_dir=runs/x/kto
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("kto"))  # the same as `rlhf kto ...`; no --config: the generic defaults
