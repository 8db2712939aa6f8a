"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2` with a short
RLHF_PG_TIMEOUT_S: the main process works alone for longer than that timeout (as a held-out
evaluation does), then every process meets in `wait_for_main` (argv[1] == "main") or in a plain
barrier ("plain", which gives up); the main process writes `ok` to argv[3]."""

import sys
import time
from pathlib import Path

from rlhf.distributed import process_state, wait_for_main

state = process_state()
if state.is_main_process:
    time.sleep(float(sys.argv[2]))
if sys.argv[1] == "main":
    wait_for_main()
else:
    state.wait_for_everyone()
if state.is_main_process:
    Path(sys.argv[3]).write_text("ok")
