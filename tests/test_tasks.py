"""The task registry: every built-in task round-trips through its own checker, names are validated
by the config, subtraction's generated data is byte for byte what it was before tasks became a
registry, and the second task (addition_reversed) does what its examples worked by hand say."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest

from rlhf.config import ConfigError, DataConfig, RMStageConfig, SFTStageConfig, TaskConfig, load_config
from rlhf.data import DataError, load_records
from rlhf.report import write_report
from rlhf.tasks import RULES, TASKS, score_generations, task_preference_records, task_records
from rlhf.tasks import addition_reversed as A
from rlhf.tasks import subtraction as S

ROOT = Path(__file__).resolve().parents[1]
# the arithmetic tasks: answers to imitate, digit buckets, generated pairs (the constraints task has
# none of these; tests/test_constraints_task.py holds its tests)
ARITHMETIC = sorted(name for name, task in TASKS.items() if task.wrong_kinds)


def small(name: str) -> TaskConfig:
    return TaskConfig(name=name, train_size=60, eval_size=30, train_digits=(2, 3, 4), eval_digits=(2, 3, 4))


# ---- the registry --------------------------------------------------------------------------------


def test_unknown_task_is_refused_naming_the_key_and_the_known_tasks():
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, ROOT / "configs/tiny/sft.yaml", ["task.name=division"])
    assert err.value.key == "task.name"
    assert "'division'" in str(err.value) and all(name in str(err.value) for name in TASKS)


def test_pair_kinds_are_checked_against_the_chosen_task():
    with pytest.raises(ConfigError) as err:
        load_config(RMStageConfig, ROOT / "configs/tiny-addrev/rm.yaml", ["pairs.kinds=[sign_error]"])
    assert err.value.key == "pairs.kinds" and "missed_carry" in str(err.value)
    with pytest.raises(ConfigError, match=r"'pairs\.train_kind_weights': unknown kind 'missed_borrow'"):
        load_config(
            RMStageConfig, ROOT / "configs/tiny-addrev/rm.yaml", ["pairs.train_kind_weights={missed_borrow: 2}"]
        )
    # null kinds means all of the task's kinds
    cfg = load_config(RMStageConfig, ROOT / "configs/tiny-addrev/rm.yaml")
    assert cfg.pairs.kinds is None and cfg.pairs.kind_weights(A.WRONG_KINDS) == [2.0, 2.0, 1.0, 1.0]


def test_fewshot_is_refused_for_a_task_without_a_fewshot_prompt():
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, ROOT / "configs/tiny-addrev/sft.yaml", ["task.fewshot=true"])
    assert err.value.key == "task.fewshot"


def test_registry_names_and_rules_are_consistent():
    assert all(task.name == name for name, task in TASKS.items())
    assert set(RULES) == {rule for task in TASKS.values() for rule in task.rules}
    assert {"subtraction", "subtraction_digits", "addition_reversed"} <= set(RULES)


@pytest.mark.parametrize("name", ARITHMETIC)
def test_every_task_round_trips_through_its_own_checker(name):
    task, cfg = TASKS[name], small(name)
    train = task_records(cfg, "train")
    assert len(train) == 60 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in train)
    evals = task_records(cfg, "eval")
    prompts, answers = [r["prompt"] for r in evals], [r["answer"] for r in evals]
    report = score_generations(name, prompts, answers, answers)
    assert report["task"] == name and report["accuracy"] == 1.0 and report["n"] == 30
    assert sum(report["n_by_digits"].values()) == 30 and set(report["accuracy_by_digits"].values()) == {1.0}
    assert score_generations(name, prompts, answers, ["x"] * 30)["accuracy"] == 0.0
    for rule in task.rules.values():
        assert rule(prompts, answers) == [1.0] * 30
    for kind in task.wrong_kinds:
        pairs = task_preference_records(cfg, [kind], 40, "train")
        assert pairs and all(p["kind"] == kind for p in pairs)
        for p in pairs:
            assert task.is_correct(p["chosen"], p["chosen"]) and not task.is_correct(p["rejected"], p["chosen"])
        questions, wrong = [p["prompt"] for p in pairs], [p["rejected"] for p in pairs]
        assert score_generations(name, questions, [p["chosen"] for p in pairs], wrong)["accuracy"] == 0.0
        exact = next(iter(task.rules.values()))  # each task lists its exact-match rule first
        assert exact(questions, wrong) == [0.0] * len(pairs)


def test_generated_records_are_wrapped_with_where_they_came_from():
    records, label = load_records(DataConfig(), small("addition_reversed"), "eval")
    assert label == "task:addition_reversed/eval" and records[0].where == "task:addition_reversed/eval item 1"


# ---- subtraction's data did not move -------------------------------------------------------------


def _digest(records: list[dict]) -> str:
    text = "\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_subtraction_data_is_byte_for_byte_what_it_was():
    # Digests computed on the code before the task registry (commit 18db813), same calls. Without a
    # test split nothing is reserved, so every generator draws exactly what it did.
    t = TaskConfig(
        name="subtraction",
        train_size=300,
        eval_size=100,
        train_digits=(2, 3, 4, 5),
        train_weights=(4, 2, 2, 2),
        test_per_bucket=0,
    )
    f = TaskConfig(name="subtraction", train_size=50, eval_size=20, fewshot=True, test_per_bucket=0)
    kinds = ("wrong_digit", "missed_borrow", "sign_error", "dropped_digit")
    assert _digest(task_records(t, "train")) == "66ee826806b659bd"
    assert _digest(task_records(t, "train", seed_offset=20)) == "183d130dd6efd565"  # PPO's prompts
    assert _digest(task_records(t, "eval")) == "005d289e45f59bd3"
    assert _digest(task_preference_records(t, kinds, 300, "train", [2.0, 2.0, 1.0, 1.0])) == "2d21d6c5ea7a12f2"
    assert _digest(task_preference_records(t, kinds, 100, "eval")) == "07598c279721a17f"
    assert _digest(task_records(f, "train")) == "113a64d41ca30ee1"
    assert _digest(task_records(f, "eval")) == "dd680dffcead1138"
    assert _digest(task_preference_records(f, ("sign_error", "dropped_digit"), 50, "train")) == "9f8555b55d0e601e"
    # kinds=None is every kind, in the task's order
    assert task_preference_records(t, None, 100, "eval") == task_preference_records(t, kinds, 100, "eval")
    # the validation split is the same with a test split as without one
    assert _digest(task_records(dataclasses.replace(t, test_per_bucket=50), "eval")) == "005d289e45f59bd3"


# ---- the test split ------------------------------------------------------------------------------

QUESTION_OF = {"subtraction": S.parse_question, "addition_reversed": A.parse_question}


def _items(name: str, records: list[dict]) -> list[tuple[int, int]]:
    """(x, y) of each generated record: SFT messages, held-out prompts or pairs."""
    prompts = [r["messages"][0]["content"] if "messages" in r else r["prompt"] for r in records]
    return [QUESTION_OF[name](p) for p in prompts]


@pytest.mark.parametrize("name", ARITHMETIC)
def test_test_split_is_disjoint_from_training_and_validation_and_has_its_own_seed(name):
    # 2-digit items are few (subtraction: 10^4, reversed addition: 9,000), so 3,000 training draws
    # and 300 test items a bucket collide unless the test items are reserved
    digits = (2, 5) if name == "subtraction" else (2, 3)  # subtraction counts the seed's buckets
    cfg = TaskConfig(
        name=name, train_size=3000, train_digits=digits, eval_size=200, eval_digits=digits, test_per_bucket=300
    )
    records = task_records(cfg, "test")
    test = _items(name, records)
    validation = set(_items(name, task_records(cfg, "eval")))
    assert len(test) == 600 and not set(test) & validation
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    assert score_generations(name, prompts, answers, answers)["n_by_digits"]["2"] == 300
    trained = {
        "sft": task_records(cfg, "train"),
        "ppo prompts": task_records(cfg, "train", seed_offset=20),
        "pairs": task_preference_records(cfg, None, 3000, "train"),
        "held-out pairs": task_preference_records(cfg, None, 600, "eval"),
    }
    for what, records in trained.items():
        assert not set(_items(name, records)) & set(test), what
    # without the reservation the same draws would have held test items: the check above can fail
    unreserved = dataclasses.replace(cfg, test_per_bucket=0)
    assert set(_items(name, task_records(unreserved, "train"))) & set(test)
    # drawn with test_seed: another seed draws other items, and the validation seed (data_seed + 1) is refused
    other = _items(name, task_records(dataclasses.replace(cfg, test_seed=cfg.test_seed + 1), "test"))
    assert len(set(other) & set(test)) < len(set(test)) // 2
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, ROOT / "configs/tiny/sft.yaml", ["task.test_seed=1235"])  # data_seed 1234 + 1
    assert err.value.key == "task.test_seed" and "validation" in str(err.value)


def test_subtraction_test_split_is_the_seeded_draw_without_validation_items():
    cfg = TaskConfig(name="subtraction", eval_size=400, eval_digits=(2, 5), test_per_bucket=1000, test_seed=77)
    validation = {(x, y) for _, x, y in S.test_items(400, (2, 5), cfg.data_seed + 1)}
    expected = S.test_items(2000, (2, 5), 77, exclude=validation)
    assert S.test_split_items(cfg) == expected
    # what was skipped: the plain draw from seed 77 holds validation items, the split none
    plain = S.test_items(2000, (2, 5), 77)
    assert {(x, y) for _, x, y in plain} & validation and plain != expected
    assert [r["prompt"] for r in task_records(cfg, "test")] == [S.PROMPT % (x, y) for _, x, y in expected]


def test_held_out_config_is_checked():
    sft = ROOT / "configs/tiny/sft.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, sft, ["task.test_per_bucket=-1"])
    assert err.value.key == "task.test_per_bucket"
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, sft, ["data.eval=data/x.jsonl", "data.test=data/x.jsonl", "data.eval_split=test"])
    assert err.value.key == "data.test"
    records, label = load_records(DataConfig(), dataclasses.replace(small("subtraction"), test_per_bucket=0), "test")
    assert (records, label) == ([], "none")
    records, label = load_records(DataConfig(), small("subtraction"), "test")
    assert label == "task:subtraction/test" and len(records) == 3 * 1000


def test_a_bucket_the_held_out_splits_use_up_is_refused_with_a_message():
    # 1-digit subtraction has 100 items; 1,000 test items hold every one, so no training item is left
    cfg = TaskConfig(name="subtraction", train_digits=(1,), eval_digits=(1,), train_size=10, eval_size=0)
    with pytest.raises(DataError, match=r"task:subtraction/train: .*1-digit bucket.*task.test_per_bucket"):
        load_records(DataConfig(), cfg, "train")


# ---- addition_reversed by hand -------------------------------------------------------------------


def test_addition_reversed_answers_and_wrong_answers_by_hand():
    assert A.answer_of(57, 68) == "521"  # 125 written units first
    assert A.answer_of(10, 20) == "03"  # the units digit 0 comes first
    assert A.PROMPT % (57, 68) == "57 + 68 =" and A.parse_question("57 + 68 =") == (57, 68)
    rng = random.Random(0)
    # 15 + 7 = 22: one carry, out of the units (5 + 7 = 12); forgetting it gives 12 -> "21"
    assert A.wrong_answer(15, 7, "missed_carry", rng) == "21"
    assert A.wrong_answer(12, 34, "missed_carry", rng) is None  # no carry at all
    # 57 + 68: carries out of the units (7 + 8) and the tens (5 + 6 + 1): 115 -> "511" or 25 -> "52"
    assert {A.wrong_answer(57, 68, "missed_carry", random.Random(s)) for s in range(20)} == {"511", "52"}
    assert A.wrong_answer(57, 68, "not_reversed", rng) == "125"
    assert A.wrong_answer(15, 7, "not_reversed", rng) is None  # 22 reads the same both ways
    assert A.wrong_answer(1, 2, "dropped_digit", rng) is None  # a single digit has none to drop
    assert A.wrong_answer(57, 68, "dropped_digit", random.Random(0)) in {"21", "51", "52"}
    wrong = A.wrong_answer(57, 68, "wrong_digit", random.Random(0))
    assert len(wrong) == 3 and sum(a != b for a, b in zip(wrong, "521", strict=True)) == 1
    with pytest.raises(ValueError, match="unknown kind"):
        A.wrong_answer(1, 2, "sign_error", rng)


def test_addition_reversed_buckets_and_rules_by_hand():
    evals = task_records(small("addition_reversed"), "eval")
    # x has exactly d digits, y at most d: the bucket is read back exactly, 10 items each
    assert [A.bucket_of(*A.parse_question(r["prompt"])) for r in evals] == [2] * 10 + [3] * 10 + [4] * 10
    q, other = A.PROMPT % (57, 68), "请计算：52 - 17 = ，直接返回计算结果"
    questions, responses = [q, q, q, q, q, other], ["521", " 521 ", "125", "52", "hello", "35"]
    assert RULES["addition_reversed"](questions, responses) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # digits right from the first (units) one, over the longer length: 125 -> 1/3 (the middle 2),
    # 52 -> 2/3, hello -> 0/5
    digits = RULES["addition_reversed_digits"](questions, responses)
    assert digits == pytest.approx([1.0, 1.0, 1 / 3, 2 / 3, 0.0, 0.0])
    report = A.accuracy_report([q, A.PROMPT % (1234, 5)], ["521", "9321"], ["521", "9320"])
    assert report == {
        "task": "addition_reversed",
        "accuracy": 0.5,
        "stderr": 0.0,  # each bucket all right or all wrong: no spread within a bucket
        "accuracy_by_digits": {"2": 1.0, "4": 0.0},
        "stderr_by_digits": {"2": 0.0, "4": 0.0},
        "n_by_digits": {"2": 1, "4": 1},
        "n": 2,
    }


def test_addition_reversed_pairs_draw_each_kind():
    pairs = task_preference_records(small("addition_reversed"), None, 400, "train", [2.0, 2.0, 1.0, 1.0])
    assert {p["kind"] for p in pairs} == set(A.WRONG_KINDS) and len(pairs) == 400
    assert all(p["chosen"] == A.answer_of(*A.parse_question(p["prompt"])) for p in pairs)


# ---- the report takes its task lines from the run's task -----------------------------------------


def test_report_draws_the_runs_task_curves(tmp_path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "config.yaml").write_text("task:\n  name: addition_reversed\n")
    rows = [{"step": s, "train/ppo/score": 0.1 * s, "train/reward/addition_reversed": 0.1 * s} for s in (1, 2, 3)]
    rows += [{"step": 3, "eval/ppo/accuracy": 0.5, "eval/ppo/accuracy_4": 0.2, "eval/ppo/accuracy_2": 0.9}]
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sft").mkdir()
    sft_eval = {"accuracy": 0.5, "accuracy_by_digits": {"2": 0.9, "4": 0.2}, "task": "addition_reversed"}
    (tmp_path / "sft" / "eval.json").write_text(json.dumps(sft_eval))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    data = json.loads((tmp_path / "plots" / "data.json").read_text())
    assert set(data["ppo_score"]) == {"score", "addition_reversed"}  # each reward source by its name
    assert list(data["ppo_eval_accuracy"]) == ["all", "2-digit", "4-digit"]
    assert "Task accuracy: addition_reversed" in page and "4-digit" in page


def test_task_config_is_a_task_spec():
    """The task package reads its config by attribute; TaskConfig has every field it reads."""
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    assert {"name", "train_size", "train_digits", "train_weights", "eval_size", "eval_digits"} <= fields
    assert {"fewshot", "data_seed", "test_per_bucket", "test_seed"} <= fields
