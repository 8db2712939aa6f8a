"""An RLHF round's labellers (issue 16): each produces pairs that stage 2 reads (its preference
loader, `normalize_preferences`), ranked lists give every ordered pair, the judge's agreement with
the gold checker is measured, and the labelling stage writes its files through its entry point."""

import json
import os

import pytest

from conftest import ROOT, run_entry
from rlhf.config import ModelInit
from rlhf.data import Record, normalize_preferences, normalize_sft
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.reward_functions import RewardFunctionError
from stages.reward.label import best_records, pair_records, split_report
from stages.reward.labellers import LABELLERS, Labelling, gold_agreement, ranked_pairs

Q = "请计算：{} = ，直接返回计算结果"
PROMPTS = [[{"role": "user", "content": Q.format("52 - 17")}], [{"role": "user", "content": Q.format("90 - 8")}]]
RESPONSES = [["35", "-35", "3"], ["82", "81"]]
ANSWERS = ["35", "82"]


def prefer_shorter(prompt, a, b):
    """A labeller function: the shorter response is better; equal lengths, no preference."""
    assert prompt[-1]["role"] == "user"
    return None if len(a) == len(b) else (0 if len(a) < len(b) else 1)


def _job(**kw) -> Labelling:
    return Labelling(prompts=PROMPTS, responses=RESPONSES, answers=ANSWERS, task="subtraction", **kw)


def _stage2(records):
    """The pairs as stage 2 reads them from a file."""
    pairs, fmt, dropped = normalize_preferences([Record(r, f"line {i + 1}") for i, r in enumerate(records)])
    assert fmt == "prompt" and not dropped
    return [(p["prompt"][-1]["content"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]


def test_a_ranked_list_gives_every_ordered_pair_and_ties_none():
    assert ranked_pairs([3.0, 2.0, 1.0]) == [(0, 1), (0, 2), (1, 2)]  # C(3, 2) = 3
    assert ranked_pairs([1.0, 0.0, 1.0, 0.0]) == [(0, 1), (0, 3), (2, 1), (2, 3)]  # the two ties drop out
    assert ranked_pairs([1.0, 1.0]) == []


def test_rule_labeller_ranks_by_the_checker_into_stage_2_pairs():
    job = _job()
    found = LABELLERS["rule"](job)
    assert found == [[(0, 1), (0, 2)], [(0, 1)]]  # 35 over -35 and 3; 82 over 81; -35 vs 3 is a tie
    assert _stage2(pair_records(job, found, "round-2")) == [
        (Q.format("52 - 17"), "35", "-35"),
        (Q.format("52 - 17"), "35", "3"),
        (Q.format("90 - 8"), "82", "81"),
    ]
    assert gold_agreement(job, found) == (1.0, 3)


def test_function_labeller_asks_each_pair_once():
    job = _job(function="test_labellers:prefer_shorter")
    found = LABELLERS["function"](job)
    # 35 vs -35: 35; 35 vs 3: 3; -35 vs 3: 3; 82 vs 81: equal length, no pair
    assert found == [[(0, 1), (2, 0), (2, 1)], []]
    assert _stage2(pair_records(job, found, "round-2"))[1] == (Q.format("52 - 17"), "3", "35")
    # of the two pairs the checker decides (35 right, -35 and 3 wrong), one agrees
    assert gold_agreement(job, found) == (0.5, 2)


def test_judge_labeller_compares_both_orders_with_a_local_model():
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    judge = build_policy(source, ModelInit(), tokenizer, seed=0).eval()
    job = _job(judge=judge, judge_tokenizer=tokenizer, principle="The right difference is better.")
    found = LABELLERS["judge"](job)
    # an untrained judge still orders each pair one way or the other (both orders asked: ties are
    # only exact), and every pair is one of the prompt's own responses against another
    assert [len(f) for f in found] == [3, 1]
    for pairs, responses in zip(found, RESPONSES, strict=True):
        assert all({b, w} <= set(range(len(responses))) and b != w for b, w in pairs)
    assert len(_stage2(pair_records(job, found, "round-2"))) == 4
    share, n = gold_agreement(job, found)
    assert n == 3 and share in (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.mark.slow
def test_label_stage_writes_pairs_and_the_rm_accuracy_before(tmp_path):
    policy = tmp_path / "policy"
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    out = tmp_path / "label"
    result = run_entry(
        "launch/stage2_label.py",
        f"policy={policy}",
        "reward_model=tiny-llama",
        "prompts=24",
        "eval_prompts=8",
        "task.train_size=64",
        "generation.max_new_tokens=4",
        "labeller.name=function",  # an untrained policy's answers are all wrong: the rule would tie them all
        "labeller.function=test_labellers:prefer_shorter",
        f"output_dir={out}",
        timeout=300,
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    lines = (out / "pairs.jsonl").read_text().splitlines()
    assert report["train"]["pairs"] == len(lines) > 0 and report["train"]["prompts"] == 24
    assert {"prompt", "chosen", "rejected", "kind"} <= set(json.loads(lines[0]))
    assert all(len(c) < len(r) for _, c, r in _stage2([json.loads(line) for line in lines]))
    assert report["eval"]["pairs"] == len((out / "eval_pairs.jsonl").read_text().splitlines()) > 0
    assert 0.0 <= report["rm_accuracy_before"] <= 1.0
    assert json.loads((out / "manifest.json").read_text())["finished"]


def refuse(prompt, a, b):
    """A labeller function that fails, as a user's can."""
    raise KeyError("grader offline")


def test_a_labeller_that_raises_is_a_one_line_labeller_error():
    with pytest.raises(RewardFunctionError, match=r"labeller 'test_labellers:refuse' raised KeyError: 'grader"):
        LABELLERS["function"](_job(function="test_labellers:refuse"))


def test_rejection_sampling_keeps_each_prompts_first_passing_answer_as_an_sft_record():
    job = Labelling(
        prompts=PROMPTS, responses=[["-35", "35", "035"], ["81", "80"]], answers=ANSWERS, task="subtraction"
    )
    # the first passing answer in sampling order (not the shortest); a prompt with none gives nothing
    assert best_records(job) == [{"messages": [*PROMPTS[0], {"role": "assistant", "content": "35"}]}]
    records, fmt = normalize_sft([Record(r, f"line {i + 1}") for i, r in enumerate(best_records(job))])
    assert fmt == "messages" and records[0]["completion"][-1]["content"] == "35"


def test_a_compared_labeller_is_measured_against_the_checker_on_the_same_samples():
    job = _job(function="test_labellers:prefer_shorter")
    report = split_report(job, LABELLERS["rule"](job), len(best_records(job)), ("function",))
    assert (report["pairs"], report["gold_agreement"], report["best_of_k"]) == (3, 1.0, 2)
    # prefer_shorter decides two of the checker's pairs and gets one right (as above)
    assert (report["function_gold_agreement"], report["function_gold_decidable_pairs"]) == (0.5, 2)
    assert report["function_pairs"] == 3 and report["policy_gold"] == 2 / 5
