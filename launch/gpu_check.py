"""The prepared device check (tools/gpu_check.py): PPO with LoRA, full fine-tuning, a shared trunk,
and GRPO at Qwen2.5-0.5B's shape; one JSON and a table of tokens/s, MFU and peak memory.

    python launch/gpu_check.py --out gpu.json       # or: make gpu-check
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import setup_cpu_threads, setup_logging
from tools.gpu_check import main

if __name__ == "__main__":
    setup_logging()
    setup_cpu_threads()
    sys.exit(main())
