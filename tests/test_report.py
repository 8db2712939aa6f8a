"""The report and the pipeline summary read by a person, from eval.json files built by the real
evaluation helpers (no model runs here): the test split quoted with its standard error beside
each accuracy, the validation split in its own table, the test items PPO fixed and broke in each
bucket, a smoothed line over a noisy curve, and Chinese that renders."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf.evaluation import changed_items, for_eval_json, summary, tracked_metrics
from rlhf.pipeline import summary_table
from rlhf.report import SMOOTH_WEIGHT, _page, cjk_fonts, ema, write_report
from rlhf.tasks.base import bucket_report
from rlhf.tasks.subtraction import PROMPT

R, W = True, False
# Test items, 4 a bucket: right (R) or wrong (W) before and after PPO.
BEFORE = {2: [R, R, W, W], 5: [W, W, W, W]}  # 2-digit 0.5, 5-digit 0.0
AFTER = {2: [W, R, R, R], 5: [R, W, R, W]}  # 2-digit 0.75, 5-digit 0.5
# 2-digit: fixed items 2 and 3, broke item 0; 5-digit: fixed items 0 and 2


def question(bucket: int, i: int) -> str:
    return PROMPT % ((10 + i, 3) if bucket == 2 else (12345 + i, 7))


def evaluation(hits: dict[int, list[bool]], validation_accuracy: float) -> dict:
    """An evaluation as rlhf.evaluation.evaluate_held_out returns it, for the given hits."""
    items = [
        {"prompt": question(b, i), "answer": "1", "response": "1" if ok else "0", "correct": ok, "bucket": str(b)}
        for b, row in hits.items()
        for i, ok in enumerate(row)
    ]
    validation = {"task": "subtraction", "accuracy": validation_accuracy, "accuracy_by_digits": {"2": 1.0, "5": 0.3}}
    return {"split": "test", **bucket_report("subtraction", hits), "items": items, "validation": validation}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    before, after = evaluation(BEFORE, 0.61), evaluation(AFTER, 0.68)
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "config.yaml").write_text("task:\n  name: subtraction\n")
    report = {
        "split": "test",
        "before": for_eval_json(before),
        "after": for_eval_json(after),
        "changed": changed_items(before, after),
        "final_kl": 0.5,
        "kl_target": 1.0,
        "beta": 0.05,
    }
    (ppo / "eval.json").write_text(json.dumps(report, ensure_ascii=False))
    # a noisy KL curve (1, 0, 1, 0, …) over 30 steps, and β logged only 5 times
    rows = [{"step": s, "train/ppo/kl": float(s % 2)} for s in range(1, 31)]
    rows += [{"step": s, "train/ppo/beta": 0.05} for s in (6, 12, 18, 24, 30)]
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_standard_errors_by_hand():
    report = bucket_report("subtraction", AFTER)
    # 2-digit: sqrt(0.75 · 0.25 / 4) = 0.21651; 5-digit: sqrt(0.5 · 0.5 / 4) = 0.25
    # overall, stratified by bucket: sqrt(4 · 0.1875 + 4 · 0.25) / 8 = sqrt(1.75) / 8 = 0.16536
    assert report["stderr_by_digits"] == {"2": 0.2165, "5": 0.25}
    assert report["stderr"] == 0.1654 and report["accuracy"] == 0.625


def test_changed_items_are_the_answers_that_turned(run_dir):
    before, after = evaluation(BEFORE, 0.61), evaluation(AFTER, 0.68)
    changed = changed_items(before, after)
    assert [i["prompt"] for i in changed["2"]["fixed"]] == [question(2, 2), question(2, 3)]
    assert [i["prompt"] for i in changed["2"]["broke"]] == [question(2, 0)]
    assert [i["prompt"] for i in changed["5"]["fixed"]] == [question(5, 0), question(5, 2)]
    assert changed["5"]["broke"] == []
    for b in ("2", "5"):  # net change = the bucket's change in accuracy
        c = changed[b]
        gain = after["accuracy_by_digits"][b] - before["accuracy_by_digits"][b]
        assert (c["n_fixed"] - c["n_broke"]) / c["n"] == pytest.approx(gain)
    assert changed["2"]["fixed"][0] == {"prompt": question(2, 2), "answer": "1", "before": "0", "after": "1"}
    # other items (another split, or none kept) compare nothing
    assert changed_items(before, {**after, "items": after["items"][1:]}) == {}


def test_tracked_metrics_keep_the_splits_apart():
    flat = tracked_metrics(evaluation(AFTER, 0.68), "ppo")
    # the validation split continues the in-loop curve; the test split has keys of its own
    assert flat["eval/ppo/accuracy"] == 0.68 and flat["eval/ppo/accuracy_5"] == 0.3
    assert flat["test/ppo/accuracy"] == 0.625 and flat["test/ppo/accuracy_2"] == 0.75
    assert flat["test/ppo/stderr"] == 0.1654
    assert summary(evaluation(AFTER, 0.68))["validation"]["accuracy"] == 0.68


def test_report_quotes_the_test_split_with_standard_errors(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "Task accuracy: subtraction, test split (the task's checker)" in page
    assert "2-digit (n 4)" in page
    # after PPO: all, 2-digit (± 0.2165, stored to 4 places), 5-digit
    assert re.search(r"<td>PPO</td><td>0\.625 ± 0\.165</td><td>0\.750 ± 0\.21[67]</td><td>0\.500 ± 0\.250</td>", page)
    assert "Task accuracy: subtraction, validation split" in page and "<td>0.680</td>" in page


def test_report_lists_the_test_items_ppo_fixed_and_broke(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "Test items PPO fixed and broke" in page
    assert "2-digit: fixed 2, broke 1 of 4 (net +25.0 points)" in page
    assert "5-digit: fixed 2, broke 0 of 4 (net +50.0 points)" in page
    rows = re.findall(r"<tr><td>(fixed|broke)</td><td>([^<]*)</td>", page)
    assert rows == [
        ("fixed", question(2, 2)),
        ("fixed", question(2, 3)),
        ("broke", question(2, 0)),
        ("fixed", question(5, 0)),
        ("fixed", question(5, 2)),
    ]


def test_a_noisy_curve_gets_a_smoothed_line(run_dir):
    write_report(run_dir)
    data = json.loads((run_dir / "plots" / "data.json").read_text())
    kl = data["ppo_kl"]["KL (per response)"]
    assert kl["y"][:3] == [1.0, 0.0, 1.0] and len(kl["smoothed"]) == 30
    # w = 0.9: s1 = 0.1 → 0.1 / (1 − 0.9) = 1; s2 = 0.09 → 0.09 / 0.19; s3 = 0.181 → 0.181 / 0.271
    assert kl["smoothed"][:3] == pytest.approx([1.0, 0.09 / 0.19, 0.181 / 0.271])
    assert SMOOTH_WEIGHT == 0.9 and "smoothed" not in data["ppo_kl"]["β"]  # 5 points: drawn as they are


def test_ema_by_hand():
    assert ema([1.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 0.25 / 0.75, 0.625 / 0.875])
    out = ema([2.0, float("nan"), 0.0], 0.5)  # a NaN is passed over
    assert out[0] == 2.0 and math.isnan(out[1]) and out[2] == pytest.approx(0.5 / 0.75)


def test_summary_quotes_the_test_split_beside_the_validation_split(run_dir):
    text = summary_table(run_dir, ("ppo",))
    assert re.search(
        r"test accuracy after\s+0\.625 ± 0\.165 \(2-digit 0\.750 ± 0\.2\d\d, 5-digit 0\.500 ± 0\.250\)", text
    )
    assert re.search(r"validation accuracy after\s+0\.680 \(2-digit 1\.000, 5-digit 0\.300\)", text)
    assert "the test split is used by nothing else" in text


@pytest.mark.slow
def test_chinese_renders_in_headless_chromium(tmp_path):
    """The page's fonts draw seed 000's prompt: its screenshot differs from one of characters no
    font has (private use), which every font draws as the same empty box. Without a CJK font
    both are rows of boxes. CI installs fonts-noto-cjk (.ci/run)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium)")
    css = re.search(r"body \{ font: [^;]*;", _page_head()).group(0)
    shots = []
    for name, text in (("cjk", "请计算：直接返回计算结果"), ("missing", "\ue000" * 12)):
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!doctype html><meta charset=utf-8><style>{css} }}</style><p>{text}</p>", encoding="utf-8")
        shot = tmp_path / f"{name}.png"
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=400,120", f"--screenshot={shot}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        shots.append(shot.read_bytes())
    assert shots[0] != shots[1], "Chinese drawn as boxes: install a CJK font (apt-get install fonts-noto-cjk)"


def test_matplotlib_finds_a_cjk_font_when_one_is_installed():
    if not (shutil.which("fc-list") and subprocess.run(["fc-list", ":lang=zh"], capture_output=True).stdout):
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    assert cjk_fonts(), "a CJK font is installed but the report's plots would not use it"


def _page_head() -> str:
    empty = {"eval": {}, "series": {}, "manifest": {}, "config": {}}
    return _page(Path("run"), {s: empty for s in ("sft", "rm", "ppo", "dpo")}, [], {})


def test_a_torn_last_line_of_metrics_jsonl_is_skipped_and_ended_on_resume(tmp_path):
    # A kill mid-write leaves half a record: the summary of the finished pipeline raised on it
    # (exit 1), and a resumed run glued its first record to the fragment.
    from rlhf.report import load_stage
    from rlhf.tracking import JSONLTracker, read_metrics

    ppo = tmp_path / "ppo"
    ppo.mkdir()
    path = ppo / "metrics.jsonl"
    path.write_text('{"step": 1, "train/ppo/score": 0.5}\n{"step": 2, "train/ppo/sco')
    assert read_metrics(path) == [{"step": 1, "train/ppo/score": 0.5}]
    assert load_stage(ppo)["series"] == {"train/ppo/score": [(1, 0.5)]}
    assert "Pipeline summary" in summary_table(tmp_path, ("ppo",))
    tracker = JSONLTracker("run", ppo)
    tracker.log({"train/ppo/score": 0.75}, step=2)
    tracker.file.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_task_with_named_kinds_is_reported_by_kind_with_the_answers_length(tmp_path):
    # the constraints task: buckets are kinds, and the answers' length shows length hacking
    from rlhf.tasks import constraints as C

    prompts = [
        C.prompt_of(C.REQUESTS[0], "tea", "lowercase", None),
        C.prompt_of(C.REQUESTS[0], "tea", "no_commas", None),
    ]
    answers = [C.answer_of("lowercase", None), C.answer_of("no_commas", None)]

    def evaluation(responses: list[str]) -> dict:
        items = [
            {"prompt": q, "answer": a, "response": r, "correct": C.is_correct(r, a), "bucket": C.TASK.bucket(q)}
            for q, a, r in zip(prompts, answers, responses, strict=True)
        ]
        return {"split": "test", **C.TASK.score(prompts, answers, responses), "items": items}

    before, after = evaluation(["Tea, hot.", "Tea, hot."]), evaluation(["tea is hot and good", "Tea is hot"])
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "config.yaml").write_text("task:\n  name: constraints\n")
    report = {"split": "test", "before": for_eval_json(before), "after": for_eval_json(after)}
    report["changed"] = changed_items(before, after)
    (ppo / "eval.json").write_text(json.dumps(report))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<th>lowercase (n 1)</th><th>no_commas (n 1)</th><th>RM score</th><th>mean words</th>" in page
    assert re.search(
        r"<td>PPO</td><td>1\.000 ± 0\.000</td><td>1\.000 ± 0\.000</td><td>1\.000 ± 0\.000</td><td>-</td><td>4\.0</td>",
        page,
    )
    assert "lowercase: fixed 1, broke 0 of 1" in page and "no_commas: fixed 1, broke 0 of 1" in page
    text = summary_table(tmp_path, ("ppo",))
    assert re.search(r"lowercase after\s+1\.000 ± 0\.000", text) and re.search(r"mean words before\s+2\.0", text)
