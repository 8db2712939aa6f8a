"""tools/bench_sft_step.py on the tiny model: it compares what it claims to compare (TRL's fused
head as shipped against ours, on one batch) and ends with its JSON line. No timing is asserted."""

from __future__ import annotations

import json
import sys

from tools import bench_sft_step


def test_bench_sft_step_compares_both_heads_on_one_batch(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_sft_step", "--config", "configs/tiny/sft.yaml", "--repeats", "1"])
    bench_sft_step.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["config"] == "configs/tiny/sft.yaml"
    batch, labelled = out["batch"], out["labelled_positions"]
    assert 0 < labelled < batch[0] * (batch[1] - 1), "the prompt's positions carry no label: compaction has work to do"
    assert out["s_per_step_trl"] > 0 and out["s_per_step_ours"] > 0
    assert abs(out["loss_ours"] - out["loss_trl"]) < 1e-6
    assert out["max_abs_grad_diff"] < 1e-5, "the compacted head must give the gradients of the full one"
