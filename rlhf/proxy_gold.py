"""Proxy against gold over a PPO run (Gao et al. 2022, "Scaling laws for reward model
overoptimization"): at each held-out evaluation, the reward model's mean score of the policy's
answers (the proxy PPO optimises) and the task checker's accuracy (the gold measure), against the
KL from the reference the policy had travelled by then. The report plots them; the pipeline's
summary warns when the proxy kept rising after gold peaked and fell.

    points = run_points(Path("runs/tiny/ppo"))
    divergence(points)   # None, or a one-line warning
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.tracking import read_metrics

# Gold must fall this far (accuracy, 0-1) below its peak before the warning speaks: about one
# standard error of a 400-item held-out accuracy near 0.85 (sqrt(0.85 · 0.15 / 400) = 0.018), so
# evaluation noise alone seldom trips it.
GOLD_DROP = 0.02
KL_WINDOW = 10  # training steps whose mean KL stands for the policy's KL at an evaluation


@dataclass(frozen=True)
class Point:
    step: int
    kl: float  # mean KL(policy ‖ reference) per response over the KL_WINDOW steps up to `step`
    proxy: float | None  # eval/ppo/rm_score: the reward model's mean score of the greedy answers
    gold: float  # eval/ppo/gold_accuracy: the share the task's checker says are right


def points_from_records(records: list[dict], before: dict | None = None) -> list[Point]:
    """One Point per evaluation in a PPO metrics.jsonl's records (the last record of a step wins,
    so a resumed run reads right), preceded by the starting policy at KL 0 when `before` (eval.json's
    "before") is given. Every point is on the split the in-loop evaluations use: where eval.json
    quotes the test split, the starting point is its "validation" block, not the test figure."""
    by_step: dict[int, dict] = {}
    for record in records:
        if record.get("step") is not None:
            by_step.setdefault(int(record["step"]), {}).update(record)
    kls = sorted((s, r["train/ppo/kl"]) for s, r in by_step.items() if "train/ppo/kl" in r)
    points = []
    before = (before or {}).get("validation", before)  # absent where the test split is off
    if before and "accuracy" in before:
        points.append(Point(step=0, kl=0.0, proxy=before.get("rm_score"), gold=before["accuracy"]))
    for step in sorted(by_step):
        record = by_step[step]
        if "eval/ppo/gold_accuracy" not in record:
            continue
        window = [kl for s, kl in kls if s <= step][-KL_WINDOW:]
        points.append(
            Point(
                step=step,
                kl=sum(window) / len(window) if window else 0.0,
                proxy=record.get("eval/ppo/rm_score"),
                gold=record["eval/ppo/gold_accuracy"],
            )
        )
    return points


def run_points(ppo_dir: Path) -> list[Point]:
    """The Points of the PPO stage in `ppo_dir` (its metrics.jsonl and eval.json); [] if it has none."""
    metrics, report = ppo_dir / "metrics.jsonl", ppo_dir / "eval.json"
    if not metrics.is_file():
        return []
    before = json.loads(report.read_text()).get("before") if report.is_file() else None
    return points_from_records(read_metrics(metrics), before)


def best_gold(points: list[Point]) -> Point | None:
    """The evaluation with the highest gold accuracy (the earliest of equals)."""
    return max(points, key=lambda p: (p.gold, -p.step)) if points else None


def divergence(points: list[Point], drop: float = GOLD_DROP) -> str | None:
    """The over-optimisation warning, or None. It speaks when, between the best-gold evaluation and
    the last one, gold fell by more than `drop` while the proxy rose: the policy kept finding what
    the reward model likes and the checker does not."""
    best, last = best_gold(points), points[-1] if points else None
    if best is None or last is best or best.proxy is None or last.proxy is None:
        return None
    if best.gold - last.gold > drop and last.proxy > best.proxy:
        return (
            f"proxy rose while gold fell: from step {best.step} to {last.step} (KL {best.kl:.2f} -> {last.kl:.2f}) "
            f"the RM score went {best.proxy:.3f} -> {last.proxy:.3f} and gold accuracy {best.gold:.3f} -> "
            f"{last.gold:.3f}; the policy over-optimises the reward model (train.keep_best=gold, a lower "
            "ppo.kl_target or fewer steps stop earlier)"
        )
    return None
