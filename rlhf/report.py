"""The run report: one self-contained HTML page (plots embedded, no network) plus the PNGs and
the data behind every plot, from what the stages left in runs/<name>/.

    python -m rlhf.report runs/tiny          # writes runs/tiny/report.html and runs/tiny/plots/

Accuracy is quoted on the test split with one standard error; the validation split's figures sit
in a table of their own. Chinese prompts need a CJK font where the page is viewed and, for any in
a plot, where it is drawn: `apt-get install fonts-noto-cjk` (the page asks for Noto Sans CJK and
its usual alternatives; matplotlib falls back to whichever of them is installed).
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import math
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import font_manager

from rlhf.checkpoint import STAGES, atomic_write_json, atomic_write_text
from rlhf.proxy_gold import best_gold, divergence, run_points
from rlhf.tasks import TASKS, bucket_figures
from rlhf.tracking import metrics_records

# Fonts that hold the Chinese of seed 000's prompts, in order of preference: Debian's
# fonts-noto-cjk, Adobe's name for the same design, macOS's and Windows' own, WenQuanYi.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "PingFang SC",
    "Microsoft YaHei",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
)
_CSS_CJK = ", ".join(f'"{name}"' for name in CJK_FONTS)
# A curve of at least SMOOTH_MIN points is drawn faint, under its exponential moving average.
SMOOTH_MIN = 20
SMOOTH_WEIGHT = 0.9  # s_t = 0.9·s_(t−1) + 0.1·x_t: about the last ten points

# (plot file, title, [(metric key, label)], y-label): one line per metric present in the run. The
# run's task adds its own lines (`Task.curves`), ppo_score one line per reward source the run logged
# (train/reward/<name>), and ppo_eval_accuracy one line per digit bucket.
CURVES = [
    ("sft_loss", "SFT: training loss", [("train/sft/loss", "loss")], "cross-entropy"),
    ("sft_token_accuracy", "SFT: token accuracy on answers", [("train/sft/mean_token_accuracy", "train")], "accuracy"),
    ("rm_loss", "RM: pairwise loss", [("train/rm/loss", "train"), ("eval/rm/loss", "held-out")], "−log σ(Δ)"),
    (
        "rm_accuracy",
        "RM: pairwise accuracy",
        [("train/rm/accuracy", "train"), ("eval/rm/accuracy", "held-out")],
        "accuracy",
    ),
    (
        "ppo_score",
        "PPO: score",
        [("train/ppo/score", "score")],
        "score",
    ),
    (
        "ppo_kl",
        "PPO: KL to the reference and β",
        [("train/ppo/kl", "KL (per response)"), ("train/ppo/beta", "β")],
        "nats / coefficient",
    ),
    ("ppo_entropy", "PPO: policy entropy", [("train/ppo/entropy", "entropy")], "nats per token"),
    (
        "ppo_clipfrac",
        "PPO: clip fraction and approximate KL",
        [("train/ppo/clipfrac", "clip fraction"), ("train/ppo/approx_kl", "approx KL")],
        "",
    ),
    ("ppo_value_loss", "PPO: value loss", [("train/ppo/value_loss", "value loss")], "½(V − return)²"),
    (
        "ppo_explained_variance",
        "PPO: value explained variance",
        [("train/ppo/explained_variance", "explained var")],
        "1 − Var(R − V)/Var(R)",
    ),
    (
        "ppo_eval_accuracy",
        "PPO: held-out accuracy during training",
        [("eval/ppo/accuracy", "all")],
        "exact match",
    ),
    ("dpo_loss", "DPO: loss", [("train/dpo/loss", "train"), ("eval/dpo/loss", "held-out")], "−log σ(β(r_c − r_r))"),
    (
        "dpo_rewards",
        "DPO: implicit rewards β·log(π/π_ref)",
        [
            ("train/dpo/rewards/margins", "margin"),
            ("train/dpo/rewards/chosen", "chosen"),
            ("train/dpo/rewards/rejected", "rejected"),
        ],
        "β·log-ratio",
    ),
    (
        "dpo_accuracy",
        "DPO: pairs ranked right by the implicit reward",
        [("train/dpo/rewards/accuracies", "train"), ("eval/dpo/rewards/accuracies", "held-out")],
        "accuracy",
    ),
]


def load_stage(directory: Path) -> dict:
    """A stage's metrics (one value per step: the last one logged, so resumed runs read right),
    eval.json and manifest.json, whichever exist."""
    series: dict[str, dict[int, float]] = {}
    tables: list[dict] = []
    path = directory / "metrics.jsonl"
    if path.is_file():
        for record in metrics_records(path):
            if "table" in record:
                tables.append(record)
                continue
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and record.get("step") is not None:
                    series.setdefault(key, {})[int(record["step"])] = float(value)
    read = lambda name: json.loads((directory / name).read_text()) if (directory / name).is_file() else {}  # noqa: E731
    config = directory / "config.yaml"
    return {
        "series": {k: sorted(v.items()) for k, v in series.items()},
        "tables": tables,
        "eval": read("eval.json"),
        "manifest": read("manifest.json"),
        "config": (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config.is_file() else {},
    }


def run_task(stages: dict) -> str | None:
    """The task of the run, from the last stage's resolved config.yaml that names one."""
    for stage in reversed(STAGES):
        name = (stages[stage]["config"].get("task") or {}).get("name")
        if name:
            return name
    return None


def curves_for(stages: dict) -> list[tuple[str, str, list[tuple[str, str]], str]]:
    """CURVES with the run's task lines added, one line per reward source and one held-out line per
    digit bucket PPO logged."""
    task = TASKS.get(run_task(stages) or "")
    prefix = "eval/ppo/accuracy_"
    names = [k.removeprefix(prefix) for k in stages["ppo"]["series"] if k.startswith(prefix)]
    buckets = sorted((d for d in names if d.isdigit()), key=int)
    extra: dict[str, list[tuple[str, str]]] = {
        "ppo_eval_accuracy": [(f"eval/ppo/accuracy_{d}", f"{d}-digit") for d in buckets],
        # each reward source (and the overlong penalty) under its name, in the order the run logged them
        "ppo_score": [
            (k, k.removeprefix("train/reward/")) for k in stages["ppo"]["series"] if k.startswith("train/reward/")
        ],
    }
    for plot, key, label in task.curves if task else ():
        extra.setdefault(plot, []).append((key, label))
    return [(name, title, keys + extra.get(name, []), ylabel) for name, title, keys, ylabel in CURVES]


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    stages = {s: load_stage(run_dir / s) for s in STAGES}
    stages.update({f"{d.parent.name}/ppo": load_stage(d) for _, d in ppo_dirs(run_dir)[1:]})  # later rounds
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    with plt.rc_context({"font.family": ["DejaVu Sans", *cjk_fonts()]}):  # per-glyph fallback for Chinese
        images, data = _plots(stages, plot_dir)
        images += proxy_gold_plots(run_dir, plot_dir, data)
    atomic_write_json(plot_dir / "data.json", data)
    page = _page(run_dir, stages, images, data)
    atomic_write_text(run_dir / "report.html", page)
    return run_dir / "report.html"


def _plots(stages: dict, plot_dir: Path) -> tuple[list[tuple[str, str, str]], dict[str, dict]]:
    """(images, data): each plot as (name, title, base64 PNG), also written to plot_dir, and the
    numbers behind each."""
    data: dict[str, dict] = {}
    images: list[tuple[str, str, str]] = []
    for name, title, keys, ylabel in curves_for(stages):
        stage = stages[name.split("_")[0]]
        lines = {label: stage["series"][key] for key, label in keys if stage["series"].get(key)}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        data[name] = {label: _plot_line(ax, label, points) for label, points in lines.items()}
        smoothed = any("smoothed" in line for line in data[name].values())  # the legend says which is the EMA
        _style(ax, title, "step", ylabel, legend=len(lines) > 1 or smoothed)
        images.append((name, title, _save(fig, plot_dir / f"{name}.png")))

    scores = stages["rm"]["eval"].get("scores")
    if scores:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        lo = min(scores["chosen"] + scores["rejected"])
        hi = max(scores["chosen"] + scores["rejected"])
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 20
        ax.hist(scores["chosen"], bins=bins, alpha=0.6, label="chosen (right answer)", color="#2a7")
        ax.hist(scores["rejected"], bins=bins, alpha=0.6, label="rejected (wrong answer)", color="#d54")
        _style(ax, "RM: held-out scores, chosen vs rejected", "reward", "pairs", legend=True)
        images.append(("rm_score_histogram", "RM score histogram", _save(fig, plot_dir / "rm_score_histogram.png")))
        data["rm_score_histogram"] = {"chosen": scores["chosen"], "rejected": scores["rejected"]}
    return images, data


def _plot_line(ax, label: str, points: list[tuple[int, float]]) -> dict:
    """One curve; a long one (noisy, step by step) faint, under its moving average. -> its data."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(xs) < SMOOTH_MIN:
        ax.plot(xs, ys, label=label, marker="o", markersize=3)
        return {"x": xs, "y": ys}
    smooth = ema(ys, SMOOTH_WEIGHT)
    (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=1)
    ax.plot(xs, smooth, color=raw.get_color(), label=f"{label} (EMA {SMOOTH_WEIGHT})")
    return {"x": xs, "y": ys, "smoothed": smooth}


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up correction: s_t = w·s_(t−1) + (1 − w)·x_t
    from s_0 = 0, reported as s_t / (1 − w^t) so the first points are not pulled toward 0. A NaN
    is passed over (reported as NaN, the average carried on)."""
    out, s, t = [], 0.0, 0
    for x in values:
        if math.isnan(x):
            out.append(float("nan"))
            continue
        t += 1
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight**t))
    return out


@functools.cache
def cjk_fonts() -> tuple[str, ...]:
    """The fonts of CJK_FONTS that matplotlib finds on this machine (none: Chinese is drawn as
    boxes). matplotlib lists the fonts it found when its cache was built; one installed since
    (apt-get install fonts-noto-cjk after the first plot) is looked for on disk and added."""

    def known() -> tuple[str, ...]:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return tuple(name for name in CJK_FONTS if name in names)

    if not known():
        for path in font_manager.findSystemFonts():
            if any(mark in Path(path).name.lower() for mark in ("cjk", "wqy", "sourcehan")):
                font_manager.fontManager.addfont(path)
    return known()


def ppo_dirs(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, directory) of every PPO stage of the run: ppo/, then round-2/ppo, round-3/ppo, …"""
    rounds = sorted(run_dir.glob("round-*/ppo"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [("PPO", run_dir / "ppo"), *((f"PPO {p.parent.name}", p) for p in rounds)]


def proxy_gold_plots(run_dir: Path, plot_dir: Path, data: dict) -> list[tuple[str, str, str]]:
    """Gao et al. 2022's picture for each PPO stage: the reward model's score (the proxy, left axis)
    and the task checker's accuracy (gold, right axis) at each held-out evaluation, against the KL
    to the reference; the best-gold evaluation marked, and the divergence warning in the title."""
    images = []
    for label, ppo_dir in ppo_dirs(run_dir):
        points = run_points(ppo_dir)
        if len(points) < 2:
            continue
        name = "ppo_proxy_gold" if ppo_dir == run_dir / "ppo" else f"ppo_proxy_gold_{ppo_dir.parent.name}"
        kl, best, warning = [p.kl for p in points], best_gold(points), divergence(points)
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        gold_ax = ax.twinx()
        has_proxy = all(p.proxy is not None for p in points)  # none: no scalar RM (rule or implicit rewards)
        if has_proxy:
            ax.plot(kl, [p.proxy for p in points], marker="o", markersize=3, color="#c60", label="RM score (proxy)")
        else:
            ax.set_yticks([])
        gold_ax.plot(kl, [p.gold for p in points], marker="s", markersize=3, color="#27a", label="gold accuracy")
        gold_ax.scatter([best.kl], [best.gold], s=90, facecolors="none", edgecolors="#27a", zorder=3)
        gold_ax.annotate(
            f"best gold, step {best.step}",
            (best.kl, best.gold),
            fontsize=8,
            xytext=(4, -12),
            textcoords="offset points",
        )
        gold_ax.set_ylabel("gold accuracy (checker)")
        title = f"{label}: proxy vs gold" if has_proxy else f"{label}: gold vs KL (no reward-model score)"
        title += " — proxy up, gold down" if warning else ""
        ylabel = "RM score (proxy)" if has_proxy else ""
        _style(ax, title, "KL(policy ‖ reference), nats per response", ylabel, legend=False)
        handles = ax.get_legend_handles_labels()[0] + gold_ax.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
        images.append((name, title, _save(fig, plot_dir / f"{name}.png")))
        data[name] = {
            "kl": kl,
            "step": [p.step for p in points],
            "proxy": [p.proxy for p in points],
            "gold": [p.gold for p in points],
            "best_gold_step": best.step,
            "warning": warning,
        }
    return images


def _style(ax, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return base64.b64encode(png).decode()


def accuracy_rows(stages: dict) -> list[tuple[str, dict]]:
    """(model, task eval) for the base model, the SFT model and the PPO and DPO models."""
    sft, ppo = stages["sft"]["eval"], stages["ppo"]["eval"]
    rows = []
    if sft.get("base"):
        rows.append(("base (before SFT)", sft["base"]))
    if "accuracy" in sft:
        rows.append(("SFT", sft))
    if ppo.get("before") and not sft:
        rows.append(("before PPO", ppo["before"]))
    if ppo.get("after"):
        rows.append(("PPO", ppo["after"]))
    dpo = stages["dpo"]["eval"]
    if dpo.get("before") and not sft:
        rows.append(("before DPO", dpo["before"]))
    if dpo.get("after"):
        rows.append(("DPO", dpo["after"]))
    for name, stage in stages.items():  # each later RLHF round's policy
        if name.startswith("round-") and stage["eval"].get("after"):
            rows.append((f"PPO {name.removesuffix('/ppo')}", stage["eval"]["after"]))
    return rows


def _page(run_dir: Path, stages: dict, images: list, data: dict) -> str:
    e = html.escape
    parts = [f"<h1>RLHF run <code>{e(run_dir.name)}</code></h1>", f"<p class=dim>{e(str(run_dir.resolve()))}</p>"]

    parts += _accuracy_tables(stages)

    for name, plot in data.items():  # the over-optimisation warnings (rlhf/proxy_gold.py), one per PPO stage
        if name.startswith("ppo_proxy_gold") and plot.get("warning"):
            where = name.removeprefix("ppo_proxy_gold").lstrip("_") or "ppo"
            parts.append(f"<p><b>Warning ({e(where)}):</b> {e(plot['warning'])}</p>")

    rm = stages["rm"]["eval"]
    if rm.get("accuracy_by_kind"):
        body = "".join(
            f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td><td>{rm['n_by_kind'].get(k, '')}</td></tr>"
            for k, v in rm["accuracy_by_kind"].items()
        )
        parts.append(
            f"<h2>Reward model (held-out pairs)</h2><p>pairwise accuracy {_fmt(rm.get('accuracy'))}, "
            f"mean margin {_fmt(rm.get('mean_margin'))}</p><table><tr><th>rejected answer</th>"
            f"<th>accuracy</th><th>pairs</th></tr>{body}</table>"
        )

    ppo = stages["ppo"]["eval"]
    if ppo:
        parts.append(
            f"<h2>PPO</h2><p>final KL to the reference {_fmt(ppo.get('final_kl'))} nats per response "
            f"({_kl_target(ppo)}), β {_fmt(ppo.get('beta'))}</p>"
        )
        parts.append(_changed_section("PPO", ppo.get("changed")))

    dpo = stages["dpo"]["eval"]
    if dpo.get("pairs"):
        pairs = dpo["pairs"]
        parts.append(
            f"<h2>DPO</h2><p>held-out pairs ranked right by the implicit reward {_fmt(pairs.get('accuracy'))}, "
            f"mean margin {_fmt(pairs.get('margin'))}, loss {_fmt(pairs.get('loss'))}</p>"
        )
    parts.append(_changed_section("DPO", dpo.get("changed")))

    perf = ""
    for stage in STAGES:
        manifest, series = stages[stage]["manifest"], stages[stage]["series"]
        wall = manifest.get("metrics", {}).get("wall_time_s")
        rate = {
            "sft": series.get("train/sft/train_samples_per_second"),
            "rm": series.get("train/rm/train_samples_per_second"),
            "ppo": series.get("train/ppo/episodes_per_s"),
            "dpo": series.get("train/dpo/train_samples_per_second"),
        }[stage]
        unit = "episodes/s" if stage == "ppo" else "examples/s"
        tokens = series.get("train/ppo/tokens_per_s") if stage == "ppo" else None
        if wall is None and not rate:
            continue
        rate_text = f"{_mean_of(rate):.1f} {unit}" if rate else "-"
        tok_text = f"{_mean_of(tokens):.0f} generated tokens/s" if tokens else ""
        perf += f"<tr><td>{stage}</td><td>{_fmt(wall, 0)} s</td><td>{rate_text}</td><td>{tok_text}</td></tr>"
    if perf:
        parts.append(
            "<h2>Wall time and throughput</h2><table><tr><th>stage</th><th>wall time</th>"
            f"<th>throughput</th><th></th></tr>{perf}</table>"
        )

    if images:
        figs = "".join(
            f'<figure><img alt="{e(t)}" id="plot-{e(n)}" src="data:image/png;base64,{b}"></figure>'
            for n, t, b in images
        )
        parts.append(f"<h2>Curves</h2><div class=grid>{figs}</div>")
    parts.append(f'<script type="application/json" id="plot-data">{e(json.dumps(data))}</script>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>RLHF run {e(run_dir.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", {_CSS_CJK}, sans-serif;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; color: #222; }}
h1 {{ font-size: 22px; margin-bottom: 0; }} h2 {{ font-size: 17px; margin-top: 28px; }} h3 {{ font-size: 15px; }}
.dim {{ color: #777; margin-top: 2px; }}
table {{ border-collapse: collapse; margin: 8px 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 10px; }}
th {{ background: #f5f5f5; text-align: left; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }}
figure {{ margin: 0; }} img {{ width: 100%; height: auto; border: 1px solid #eee; }}
</style></head><body>
{"".join(parts)}
</body></html>
"""


def _accuracy_tables(stages: dict) -> list[str]:
    """The task accuracy of each model on the quoted (test) split, ± one standard error, then on
    the validation split in a table of its own."""
    rows = accuracy_rows(stages)
    if not rows:
        return []
    task, split = html.escape(run_task(stages) or ""), rows[-1][1].get("split", "held-out")
    notes = {
        "test": "drawn with its own seed, no training or validation item among them, used by nothing else",
        "validation": "the split in-loop evaluation, any choice of checkpoint and tuning read: not an unbiased figure",
    }
    out = [_accuracy_table(f"Task accuracy: {task}, {split} split (the task's checker)", rows, notes.get(split, ""))]
    validation = [(name, r["validation"]) for name, r in rows if r.get("validation")]
    if validation:
        out.append(_accuracy_table(f"Task accuracy: {task}, validation split", validation, notes["validation"]))
    return out


def _accuracy_table(title: str, rows: list[tuple[str, dict]], note: str) -> str:
    e = html.escape
    buckets = list(dict.fromkeys(d for _, r in rows for d in bucket_figures(r)[0]))  # in the tasks' order
    _, _, sizes, bucket_name = bucket_figures(rows[-1][1])
    head = "".join(f"<th>{e(bucket_name(d))}{f' (n {sizes[d]})' if d in sizes else ''}</th>" for d in buckets)
    # the answers' length where the task reports it: a policy gaming a learned reward often does it by length
    words = any("mean_words" in r for _, r in rows)
    head += "<th>RM score</th>" + ("<th>mean words</th>" if words else "")
    body = ""
    for name, r in rows:
        accuracy, errors, _, _ = bucket_figures(r)
        cells = "".join(f"<td>{_pm(accuracy.get(d), errors.get(d))}</td>" for d in buckets)
        cells += f"<td>{_fmt(r.get('rm_score'))}</td>" + (f"<td>{_fmt(r.get('mean_words'), 1)}</td>" if words else "")
        body += f"<tr><td>{e(name)}</td><td>{_pm(r.get('accuracy'), r.get('stderr'))}</td>{cells}</tr>"
    return (
        f"<h2>{title}</h2><p class=dim>± one standard error, sqrt(p(1 − p)/n) per bucket; {e(note)}</p>"
        f"<table><tr><th>model</th><th>all</th>{head}</tr>{body}</table>"
    )


def _changed_section(stage: str, changed: dict | None) -> str:
    """The test items whose answer turned right (fixed) or wrong (broke) in `stage`, per bucket."""
    if not changed:
        return ""
    e, mark = html.escape, {True: "✔", False: "✘"}
    body = ""
    for bucket, c in changed.items():
        name = f"{bucket}-digit" if bucket.isdigit() else bucket
        net = 100 * (c["n_fixed"] - c["n_broke"]) / max(c["n"], 1)
        body += (
            f"<tr><th colspan=5>{e(name)}: fixed {c['n_fixed']}, broke {c['n_broke']} of {c['n']} "
            f"(net {net:+.1f} points)</th></tr>"
        )
        for kind, before_right in (("fixed", False), ("broke", True)):
            body += "".join(
                f"<tr><td>{kind}</td><td>{e(i['prompt'])}</td><td>{e(i['answer'])}</td>"
                f"<td>{e(i['before'])} {mark[before_right]}</td><td>{e(i['after'])} {mark[not before_right]}</td></tr>"
                for i in c[kind]
            )
    return (
        f"<h3>Test items {stage} fixed and broke</h3><table><tr><th></th><th>prompt</th><th>answer</th>"
        f"<th>before {stage}</th><th>after {stage}</th></tr>{body}</table>"
    )


def _pm(value, se) -> str:
    """0.824 ± 0.012"""
    return _fmt(value) if se is None or _fmt(value) == "-" else f"{_fmt(value)} ± {_fmt(se)}"


def _kl_target(ppo: dict) -> str:
    """PPO's KL target as the report says it: a number, or that β stayed fixed."""
    target = ppo.get("kl_target")
    return f"target {_fmt(target)}" if target is not None else "β fixed, no target"


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else html.escape(str(value))


def _mean_of(points) -> float:
    values = [v for _, v in points]
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write runs/<name>/report.html from a pipeline run")
    parser.add_argument("run_dir", help="e.g. runs/tiny")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
