"""Stage 3, CPO or SimPO (loss.type: simpo): reference-free preference losses (TRL experimental).

accelerate launch launch/stage3_cpo.py --config configs/tiny/simpo.yaml policy=runs/x/sft output_dir=runs/x/simpo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stages.commands import run_command

if __name__ == "__main__":
    sys.exit(run_command("cpo"))  # the same as `rlhf cpo ...`; no --config: the generic defaults
