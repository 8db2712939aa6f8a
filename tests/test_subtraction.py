"""Seed 000's subtraction task: our generators write the seed's formats, files written by the
seed's own scripts load unchanged, and scoring per digit bucket is right."""

import json
import random
import re

import pytest

from rlhf.data import DataError, normalize_sft, read_records
from rlhf.tasks import subtraction as S

SEED_TEST_LINE = re.compile(r'^\{"prompt":"请计算：(\d+) - (\d+) = ，直接返回计算结果","answer":"(-?\d+)"\}$')


def run_seed_script(code: str, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    exec(compile(code, "seed_000", "exec"), {})


def test_seed_test_script_output_loads_unchanged(seed_000_scripts, tmp_path, monkeypatch):
    run_seed_script(seed_000_scripts["test"], tmp_path, monkeypatch)
    path = tmp_path / "LLM_minus_test_data.jsonl"
    records = read_records(str(path))
    examples, fmt = normalize_sft(records)
    assert fmt == "prompt_answer" and len(examples) == 1000
    # The file's quarters are the seed's 2/5/10/20-digit buckets; ours recovers nearly all of them.
    buckets = [S.bucket_of(*S.parse_question(e["prompt"][0]["content"])) for e in examples]
    expected = [S.SEED_BUCKETS[i * 4 // 1000] for i in range(1000)]
    assert sum(b == e for b, e in zip(buckets, expected, strict=False)) >= 980


def test_our_test_records_match_the_seed_format_byte_for_byte_shape():
    rng = random.Random(0)
    for _ in range(200):
        x, y = S.sample_item(rng, 5)
        line = json.dumps(S.test_record(x, y), ensure_ascii=False, separators=(",", ":"))
        m = SEED_TEST_LINE.match(line)
        assert m and int(m.group(1)) - int(m.group(2)) == int(m.group(3))


def test_seed_sft_script_verbatim_is_refused_with_file_and_line(seed_000_scripts, tmp_path, monkeypatch):
    # Run verbatim, the seed's SFT script writes raw newlines inside JSON strings.
    run_seed_script(seed_000_scripts["sft"], tmp_path, monkeypatch)
    path = tmp_path / "LLM_minus_SFT_train_data.jsonl"
    with pytest.raises(DataError) as err:
        read_records(str(path))
    message = str(err.value)
    assert f"{path}:1:" in message and "raw newline" in message and "\n" not in message


def test_seed_sft_script_with_escaped_newlines_loads(seed_000_scripts, tmp_path, monkeypatch):
    # The same script with its JSON escapes kept (\\n), as the author meant: loads as chat data,
    # the seed's `+` typo in the question included.
    fixed = seed_000_scripts["sft"].replace("\\n", "\\\\n").replace("]}\\\\n'", "]}\\n'")
    run_seed_script(fixed, tmp_path, monkeypatch)
    examples, fmt = normalize_sft(read_records(str(tmp_path / "LLM_minus_SFT_train_data.jsonl")))
    assert fmt == "messages" and len(examples) == 10000
    question = examples[0]["prompt"][0]["content"]
    assert question.startswith("你是一个数学计算器") and " + " in question.splitlines()[-1]
    x, y = S.parse_question(question)
    assert examples[0]["completion"][0]["content"] == str(x - y)


def test_our_sft_records_follow_the_seed_sft_format():
    rec = S.sft_record(29, 68)
    assert list(rec) == ["messages"] and [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["messages"][0]["content"] == S.FEWSHOT_PROMPT % (29, 68)
    assert rec["messages"][1]["content"] == "-39"
    assert S.sft_record(3, 4, fewshot=False)["messages"][0]["content"] == "请计算：3 - 4 = ，直接返回计算结果"


def test_test_items_split_buckets_like_the_seed():
    items = S.test_items(1000, S.SEED_BUCKETS, seed=0)
    assert [dx for dx, _, _ in items[::250]] == [2, 5, 10, 20]
    for dx, x, y in items:
        assert 0 <= x < 10**dx and 0 <= y < 10**dx


def test_accuracy_report_per_bucket():
    prompts = [S.PROMPT % (12, 3), S.PROMPT % (50, 60), S.PROMPT % (12345, 2), S.PROMPT % (99999, 99999)]
    answers = ["9", "-10", "12343", "0"]
    responses = [" 9", "10", "12343\n", "1"]
    report = S.accuracy_report(prompts, answers, responses)
    # 2-digit: "9" right, "10" wrong (sign) -> 0.5; 5-digit: right, wrong -> 0.5
    # standard error per bucket sqrt(0.5 · 0.5 / 2) = 0.35355; overall, stratified by bucket:
    # sqrt(2 · 0.25 + 2 · 0.25) / 4 = 0.25
    assert report == {
        "task": "subtraction",
        "accuracy": 0.5,
        "stderr": 0.25,
        "accuracy_by_digits": {"2": 0.5, "5": 0.5},
        "stderr_by_digits": {"2": 0.3536, "5": 0.3536},
        "n_by_digits": {"2": 2, "5": 2},
        "n": 4,
    }


@pytest.mark.parametrize("kind", S.WRONG_KINDS)
def test_wrong_answers_are_wrong_and_of_their_kind(kind):
    rng = random.Random(1)
    made = 0
    for _ in range(300):
        x, y = S.sample_item(rng, rng.choice([2, 5]))
        wrong = S.wrong_answer(x, y, kind, rng)
        if wrong is None:
            continue
        made += 1
        right = x - y
        assert wrong != str(right) and re.fullmatch(r"-?\d+", wrong)
        if kind == "sign_error":
            assert int(wrong) == -right
        if kind == "missed_borrow":
            assert abs(int(wrong)) - abs(right) in {10**k for k in range(1, 7)}
        if kind == "dropped_digit":
            assert len(wrong.lstrip("-")) < len(str(abs(right)))
        if kind == "wrong_digit":
            assert len(wrong) == len(str(right))
    assert made > 100


def test_missed_borrow_by_hand():
    # 52 - 17: units 2 < 7 borrow from the tens; forgetting it gives 45 instead of 35.
    assert S.wrong_answer(52, 17, "missed_borrow", random.Random(0)) == "45"
    # 17 - 52 = -35: the same slip on the magnitude gives -45.
    assert S.wrong_answer(17, 52, "missed_borrow", random.Random(0)) == "-45"
    assert S.wrong_answer(58, 17, "missed_borrow", random.Random(0)) is None  # no borrow at all


def test_kind_weights_shape_the_training_mix():
    rng = random.Random(0)
    kinds = ["wrong_digit", "sign_error"]
    drawn = [S.preference_record(53127, 2981, kinds, rng, weights=[9.0, 1.0])["kind"] for _ in range(2000)]
    share = drawn.count("wrong_digit") / len(drawn)
    assert 0.87 < share < 0.93  # 9 : 1
    uniform = [S.preference_record(53127, 2981, kinds, rng)["kind"] for _ in range(2000)]
    assert 0.45 < uniform.count("wrong_digit") / len(uniform) < 0.55


def test_rule_rewards_by_hand():
    from rlhf.tasks import RULES

    q = S.PROMPT % (52, 17)  # 35
    big = S.PROMPT % (10000, 12345)  # -2345
    questions = [q, q, q, q, big, big, "what is the weather"]
    responses = [" 35 ", "36", "135", "7", "-2345", "2345", "35"]
    assert RULES["subtraction"](questions, responses) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    # units-aligned characters right over the longer length: 36 -> 1/2, 135 -> 2/3, 7 -> 0/2,
    # 2345 against -2345 -> 4/5 (the sign is one of the characters)
    assert RULES["subtraction_digits"](questions, responses) == pytest.approx([1.0, 0.5, 2 / 3, 0.0, 1.0, 0.8, 0.0])


def test_english_prompts_parse_score_and_keep_the_splits():
    from rlhf.config import ConfigError, SFTStageConfig, load_config

    zh = load_config(SFTStageConfig, "configs/tiny/sft.yaml", ["task.test_per_bucket=5", "task.eval_size=8"])
    small = ["task.test_per_bucket=5", "task.eval_size=8"]
    en = load_config(SFTStageConfig, "configs/tiny/sft.yaml", [*small, "task.prompt_language=en"])
    zh_test, en_test = S.test_records(zh.task), S.test_records(en.task)
    # the same items in another language: the answers, and the questions parsed back, agree
    assert [r["answer"] for r in zh_test] == [r["answer"] for r in en_test]
    assert [S.parse_question(r["prompt"]) for r in zh_test] == [S.parse_question(r["prompt"]) for r in en_test]
    assert en_test[0]["prompt"].startswith("Compute: ") and "请" not in en_test[0]["prompt"]
    # the few-shot English prompt quotes five solved examples; the question is the last one
    assert S.parse_question(S.question(12, 345, fewshot=True, language="en")) == (12, 345)
    assert S.subtraction_exact([S.question(50, 8, language="en")], ["42"]) == [1.0]
    pair = S.pair_records(en.task, S.WRONG_KINDS, 4, "train")[0]
    assert pair["prompt"].startswith("Compute: ")
    with pytest.raises(ConfigError, match="prompt_language"):
        load_config(SFTStageConfig, "configs/tiny-addrev/sft.yaml", ["task.prompt_language=en"])
