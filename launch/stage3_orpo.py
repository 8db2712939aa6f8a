"""Stage 3, ORPO: SFT and preference learning in one loss, no reference model (TRL experimental).

accelerate launch launch/stage3_orpo.py --config configs/tiny/orpo.yaml policy=runs/x/sft output_dir=runs/x/orpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("orpo"))  # the same as `rlhf orpo ...`; no --config: the generic defaults
