"""The pieces of tools/smoke_real_shape.py (the run itself is too slow for the suite: well
over ten minutes per mode on a 2-core CPU): its figures from metrics records worked out by hand, and peak
memory read from real child processes."""

import subprocess
import sys
import time

import pytest

from rlhf.pipeline import resolved_stage_config
from tools import smoke_real_shape as smoke


def test_sft_and_rm_rates_leave_out_the_first_step():
    # steps 1, 2, 3 logged at t = 100, 110, 130 s with 50, 100, 170 tokens seen so far:
    # steps 2 and 3 took 30 s for 120 tokens -> 15 s/step, 4 tokens/s
    records = [
        {"step": s, "time": t, "train/rm/loss": 0.7, "train/rm/num_tokens": n}
        for s, t, n in ((1, 100.0, 50), (2, 110.0, 100), (3, 130.0, 170))
    ]
    records.append({"step": 3, "time": 131.0, "train/rm/train_runtime": 31.0})  # the Trainer's summary: ignored
    assert smoke.step_rates(records, "rm") == {"s_per_step": 15.0, "tokens_per_s": 4.0}
    assert smoke.step_rates(records[:1], "rm") == {"s_per_step": None, "tokens_per_s": None}


def test_ppo_rates_from_its_own_step_timings():
    # step 1 left out; step 2: 1 + 0.5 + 2.5 = 4 s at 10 tokens/s (40 tokens); step 3: 2 + 1 + 3 = 6 s
    # at 5 tokens/s (30 tokens) -> 10 s for 2 steps = 5 s/step, 70 tokens / 10 s = 7 tokens/s
    def step(n, generate, score, train, rate):
        return {
            "step": n,
            "train/ppo/time_generate_s": generate,
            "train/ppo/time_score_s": score,
            "train/ppo/time_train_s": train,
            "train/ppo/tokens_per_s": rate,
        }

    records = [step(1, 9.0, 9.0, 9.0, 1.0), step(3, 2.0, 1.0, 3.0, 5.0), step(2, 1.0, 0.5, 2.5, 10.0)]
    assert smoke.step_rates(records, "ppo") == {"s_per_step": 5.0, "tokens_per_s": 7.0}


@pytest.mark.slow
def test_peak_watcher_reads_each_process_peak_and_leaves_out_the_launcher(tmp_path):
    script = tmp_path / "stage9_fake.py"
    # writes 300 MiB (so the pages are resident), frees them, then idles: only a peak can show it.
    # It forks a helper first (as data loading does), which carries its command line and outlives
    # it: left out. The worker is seen exiting, when its command line reads empty: still counted.
    script.write_text(
        "import os, time\n"
        "if os.fork() == 0:\n    time.sleep(2.5)\n    os._exit(0)\n"
        "x = b'\\x01' * (300 * 2**20)\ndel x\ntime.sleep(1.5)\n"
    )
    watcher = smoke.PeakWatcher(interval=0.1)
    watcher.start()
    worker = subprocess.Popen([sys.executable, str(script)])
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1.5)", "accelerate.commands.launch", str(script)]
    )
    worker.wait(), launcher.wait()
    time.sleep(0.05)
    watcher.stop()
    (peak,) = watcher.peaks("stage9_fake.py")  # one process: the launcher-like one and the fork left out
    assert 300 <= peak < 300 + 200  # 300 MiB written, plus the interpreter


def test_both_modes_load_as_the_pipeline_command_would(tmp_path):
    """The cut-down overrides pass the pipeline's own checks (every stage draws the same held-out
    splits), keep the real shape and LoRA, and cut the end-of-stage evaluation to a few items:
    the run itself is too slow for the suite, so a config it would refuse must fail here."""
    for mode, processes in (("single", 1), ("zero3", 2)):
        cfg = smoke.pipeline_config(mode, 3, tmp_path)
        assert (cfg.model, cfg.num_processes or 1) == ("qwen2.5-0.5b-shape", processes)
        for stage in smoke.STAGES:
            stage_cfg = resolved_stage_config(cfg, stage)
            assert stage_cfg.lora.enabled and stage_cfg.lora.r == 16
            assert stage_cfg.train.max_steps == 3
            assert (stage_cfg.task.eval_size, stage_cfg.task.test_per_bucket) == (4, 2)
