"""The model card every stage writes as README.md in its output directory, the page the Hugging
Face Hub shows: what the model is (base model, the model it started from, method), what it learnt
from (data), how well it does (the figures of eval.json and the training metrics) and the exact
command that made it. Written by `finish_stage` before the manifest, atomically."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from rlhf.tasks import bucket_figures

# what each stage is, in a sentence, with the method's paper
METHODS = {
    "sft": "supervised fine-tuning (cross-entropy on the answers)",
    "rm": "a reward model: the decoder with a scalar head, trained on chosen/rejected pairs "
    "(−log σ(r_chosen − r_rejected); Ouyang et al. 2022)",
    "ppo": "RLHF with PPO against a reward model, KL-penalised to the reference (Ouyang et al. 2022)",
    "dpo": "Direct Preference Optimization (Rafailov et al. 2023)",
    "kto": "Kahneman-Tversky Optimization on liked / disliked answers (Ethayarajh et al. 2024)",
    "orpo": "Odds Ratio Preference Optimization, no reference model (Hong et al. 2024)",
    "simpo": "SimPO, reference-free, length-normalised (Meng et al. 2024)",
    "cpo": "Contrastive Preference Optimization, reference-free (Xu et al. 2024)",
}
_SPLITS = ("base", "before", "after")  # evaluations of the starting model and of this one
_NOT_FIGURES = {"items", "changed", "scores", "validation", *_SPLITS, "pairs"}


def launch_command(argv: list[str] | None = None) -> str:
    """The command line that ran this process, as a user would type it again: under `accelerate
    launch` (which sets LOCAL_RANK in each process it starts, WORLD_SIZE their number) with the
    same arguments."""
    argv = list(sys.argv if argv is None else argv)
    runner = "python"
    if "LOCAL_RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        runner = "accelerate launch" + (f" --num_processes {world}" if world > 1 else "")
    return f"{runner} {shlex.join(argv)}"


def model_card(*, stage: str, model: str, base_model: str, metrics: dict, eval_report: dict | None,
               data: dict | None, command: str, config_hash: str) -> str:  # fmt: skip
    """The README.md text: YAML front matter the hub reads, then what, from what, how well, how."""
    hub_base = base_model if _is_hub_id(base_model) else None
    lines = ["---", "library_name: transformers", f"tags: [rlhf-pipeline, {stage}]"]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["---", "", f"# {Path(base_model).name or base_model}, {stage}", ""]
    lines += [f"Trained by the rlhf-pipeline stage `{stage}`: {METHODS.get(stage, stage)}.", ""]
    lines += ["| | |", "|---|---|", f"| base model | `{base_model}` |", f"| started from | `{model}` |"]
    for split, source in (data or {}).items():
        if source:
            lines.append(f"| data ({split}) | `{source}` |")
    lines += [f"| config | `config.yaml` (hash `{config_hash}`) |", ""]
    lines += _figures(eval_report or {}, metrics)
    lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _figures(report: dict, metrics: dict) -> list[str]:
    """The held-out accuracy before/after, the held-out pairs, then every other number of eval.json
    and the training metrics (`eval.json` holds them all)."""
    out = ["## Results", "", "From `eval.json` in this directory.", ""]
    rows = [(name, report[name]) for name in _SPLITS if isinstance(report.get(name), dict)]
    if _is_number(report.get("accuracy")) and "before" not in report:
        rows.append(("this model", report))
    if rows:
        out += ["| model | split | accuracy | by bucket |", "|---|---|---|---|"]
        out += [f"| {name} | {e.get('split', '')} | {_acc(e)} | {_buckets(e)} |" for name, e in rows if e]
        out.append("")
    pairs = report.get("pairs")
    if isinstance(pairs, dict):
        sides = {k: v for k, v in pairs.items() if isinstance(v, dict)} or {"this model": pairs}
        keys = sorted({k for side in sides.values() for k in side})
        out += ["Held-out pairs:", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        out += [f"| {side} | " + " | ".join(str(v.get(k, "")) for k in keys) + " |" for side, v in sides.items()]
        out.append("")
    shown = set(_NOT_FIGURES)
    if rows and rows[-1][0] == "this model":  # its headline is in the table above
        shown |= {"accuracy", "stderr", "accuracy_by_digits", "accuracy_by_kind"}
    others = _numbers({k: v for k, v in report.items() if k not in shown})
    others += _numbers({k: v for k, v in metrics.items() if k in ("train_loss", "wall_time_s", "overlong")})
    if others:
        out += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in others], ""]
    return out


def _acc(e: dict) -> str:
    if not _is_number(e.get("accuracy")):
        return ""
    stderr = e.get("stderr")
    return f"{e['accuracy']:.4f}" + (f" ± {stderr:.4f}" if _is_number(stderr) else "")


def _buckets(e: dict) -> str:
    by_bucket, _, _, name = bucket_figures(e)
    return ", ".join(f"{name(k)}: {v:.3f}" for k, v in by_bucket.items() if _is_number(v))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of the numbers in `d` and its nested dicts (two levels)."""
    out = []
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out.append((f"{prefix}{k}", round(v, 4) if isinstance(v, float) else v))
        elif isinstance(v, dict) and not prefix:
            out += _numbers(v, f"{k}.")
    return out


def _is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: the hub links it as the base model."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
