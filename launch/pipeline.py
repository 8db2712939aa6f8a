"""SFT -> reward model -> PPO in one command (see rlhf/pipeline.py and the README).

python launch/pipeline.py                      # the built-in tiny default, runs/tiny/
python launch/pipeline.py --config configs/qwen2.5-0.5b/pipeline.yaml name=qwen
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
