"""The constraints task (rlhf/tasks/constraints.py): each checker on hand-written responses that
pass and fail, the constraint read back from every kind of prompt, the held-out splits apart from
each other and from training, the eval.json block counted by hand, its rule reward, and what it
refuses (pairs, few-shot prompts)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest

from rlhf.config import ConfigError, DataConfig, SFTStageConfig, TaskConfig, load_config
from rlhf.data import DataError, load_records
from rlhf.tasks import RULES, TASKS, score_generations, task_preference_records, task_records
from rlhf.tasks import constraints as C

ROOT = Path(__file__).resolve().parents[1]
PINNED = ["9f95a2b3e642f57e", "a73ad5ffec85d8ec", "865a93cbf84c1f2d"]  # train, validation, test of cfg()


def cfg(**changes) -> TaskConfig:
    return TaskConfig(name="constraints", **{"train_size": 100, "eval_size": 24, "test_per_bucket": 10, **changes})


# ---- the checkers: (kind, arg, response, satisfied?) written by hand ---------------------------------------

CASES = [
    ("max_words", 5, "The ocean is very deep.", True),  # 5 words
    ("max_words", 5, "The ocean is very deep indeed.", False),  # 6
    ("max_words", 5, "  Deep blue sea.  \n", True),  # surrounding white space is not a word
    ("min_words", 15, " ".join(["word"] * 15), True),
    ("min_words", 15, " ".join(["word"] * 14), False),
    ("include_word", "light", "Light fills the room.", True),  # case-insensitive
    ("include_word", "light", "The room is bright, full of light!", True),
    ("include_word", "light", "Lightning struck twice.", False),  # word boundaries: not inside another word
    ("avoid_word", "the", "Coffee tastes best hot.", True),
    ("avoid_word", "the", "The coffee is hot.", False),  # "The" counts as "the"
    ("avoid_word", "the", "There is coffee over there.", True),  # "there" is not "the"
    ("avoid_word", "is", "It is.", False),
    ("lowercase", None, "the moon is bright tonight, 2 hours after 9pm.", True),  # digits and punctuation free
    ("lowercase", None, "The moon is bright.", False),
    ("lowercase", None, "123 ... !", False),  # no letters: fails both case kinds
    ("uppercase", None, "THE MOON IS BRIGHT, 2 HOURS AFTER 9PM.", True),
    ("uppercase", None, "THE MOON IS BRiGHT.", False),
    ("uppercase", None, "123 ... !", False),
    ("no_commas", None, "Rain falls softly on the roof.", True),
    ("no_commas", None, "Rain falls, softly.", False),
    ("no_commas", None, "Rain falls，softly.", False),  # the full-width comma counts too
    ("end_phrase", "That is all.", "Bread is baked from flour. That is all.  \n", True),  # trailing spaces
    ("end_phrase", "That is all.", "Bread is baked from flour. That is all", False),  # the period is part of it
    ("end_phrase", "That is all.", "That is all. Bread is baked.", False),
    ("end_phrase", "That is all.", "Bread. that is all.", False),  # exact: case counts
    ("start_word", "Yes", "Yes, tea calms the mind.", True),  # punctuation after the word is removed
    ("start_word", "Yes", "yes tea calms the mind.", True),  # case-insensitive
    ("start_word", "Yes", "Yesterday I drank tea.", False),
    ("start_word", "Yes", "Tea? Yes.", False),
    ("bullets", 3, "- one\n- two\n- three", True),
    ("bullets", 3, "- one\n\n- two\n\n- three\n", True),  # blank lines between bullets are allowed
    ("bullets", 3, "* one\n* two\n* three", True),
    ("bullets", 3, "- one\n- two", False),  # too few
    ("bullets", 3, "Here you go:\n- one\n- two\n- three", False),  # a line that is not a bullet
    ("bullets", 2, "- one\n-two", False),  # "-two" has no space after the marker
    ("bullets", 2, "- one\n- ", False),  # an empty bullet
    ("json_keys", ("title", "summary"), '{"title": "Rain", "summary": "Wet."}', True),
    ("json_keys", ("title", "summary"), '```json\n{"title": "Rain", "summary": "Wet.", "x": 1}\n```', True),
    ("json_keys", ("title", "summary"), '```\n{"title": "Rain", "summary": "Wet."}\n```', True),
    ("json_keys", ("title", "summary"), '{"title": "Rain"}', False),  # a key missing
    ("json_keys", ("title", "summary"), 'Here: {"title": "Rain", "summary": "Wet."}', False),  # not JSON only
    ("json_keys", ("title", "summary"), '["title", "summary"]', False),  # not an object
    ("json_keys", ("title", "summary"), "{'title': 'Rain', 'summary': 'Wet.'}", False),  # not JSON
    ("quotation", None, '"Snow is frozen water."', True),
    ("quotation", None, ' "Snow is frozen water." \n', True),
    ("quotation", None, '"Snow is frozen water.', False),
    ("quotation", None, '""', False),  # nothing inside
    ("quotation", None, "Snow is frozen water.", False),
]


@pytest.mark.parametrize(("kind", "arg", "response", "expected"), CASES)
def test_checker_by_hand(kind, arg, response, expected):
    assert C.check(kind, arg, response) is expected
    assert C.is_correct(response, C.answer_of(kind, arg)) is expected


def test_every_kind_has_hand_cases_that_pass_and_fail():
    assert {(k, e) for k, _, _, e in CASES} == {(k, e) for k in C.KINDS for e in (True, False)}


@pytest.mark.parametrize("kind", C.KINDS)
def test_an_empty_response_satisfies_nothing(kind):
    arg = C.ARGS[kind][0]
    assert not C.check(kind, arg, "") and not C.check(kind, arg, "  \n ")


def test_the_answer_is_canonical_json_of_the_constraint():
    assert C.answer_of("max_words", 10) == '{"kind": "max_words", "arg": 10}'
    assert C.answer_of("lowercase", None) == '{"kind": "lowercase", "arg": null}'
    assert json.loads(C.answer_of("json_keys", ("a", "b"))) == {"kind": "json_keys", "arg": ["a", "b"]}
    assert C.parse_answer(C.answer_of("json_keys", ("a", "b"))) == ("json_keys", ("a", "b"))
    with pytest.raises(ValueError, match="not a constraint answer"):
        C.is_correct("x", "42")


# ---- prompts -------------------------------------------------------------------------------------------


def test_parse_constraint_reads_back_every_kind_of_every_generated_prompt():
    items = C.train_items(cfg(train_size=2000)) + C.validation_items(cfg()) + C.test_split_items(cfg())
    assert {kind for _, kind, _ in items} == set(C.KINDS)
    for prompt, kind, arg in items:
        assert C.parse_constraint(prompt) == (kind, arg), prompt
        assert C.TASK.bucket(prompt) == kind  # as score keys it: the report names the bucket
    # every parameter of every kind, with every request and a topic, round-trips
    for kind in C.KINDS:
        for arg in C.ARGS[kind]:
            for request in C.REQUESTS:
                assert C.parse_constraint(C.prompt_of(request, "a cat", kind, arg)) == (kind, arg)
    assert C.parse_constraint("Describe autumn briefly. Do not use any commas in your answer.  ") == ("no_commas", None)
    with pytest.raises(ValueError, match="no constraint"):
        C.parse_constraint("Describe autumn briefly.")


def test_a_prompt_is_a_request_then_the_constraint():
    prompt = C.prompt_of("Describe {topic} briefly.", "autumn", "max_words", 10)
    assert prompt == "Describe autumn briefly. Answer in at most 10 words."
    assert C.sentence("json_keys", ("title", "summary")) == (
        'Answer with a JSON object only, with the keys "title" and "summary".'
    )


# ---- splits ----------------------------------------------------------------------------------------------


def test_splits_are_sized_spread_over_kinds_and_disjoint_from_training():
    spec = cfg(train_size=2000, eval_size=36, test_per_bucket=20)
    validation, test = task_records(spec, "eval"), task_records(spec, "test")
    assert len(validation) == 36 and len(test) == 20 * len(C.KINDS)
    assert all(isinstance(r["prompt"], str) for r in validation + test)  # as subtraction's held-out records
    per_kind = score_generations("constraints", [r["prompt"] for r in test], [r["answer"] for r in test], [""] * 240)
    assert per_kind["n_by_kind"] == dict.fromkeys(sorted(C.KINDS), 20)
    v_kinds = [C.parse_constraint(r["prompt"])[0] for r in validation]
    assert all(v_kinds.count(k) == 3 for k in C.KINDS)  # 36 spread evenly over 12 kinds
    held_out = {r["prompt"] for r in validation} | {r["prompt"] for r in test}
    assert len(held_out) == 36 + 240  # no repeats, no validation prompt in the test split
    for offset in (0, 20):  # SFT-stage prompts and PPO's fresh prompts
        train = task_records(spec, "train", seed_offset=offset)
        assert len(train) == 2000
        assert all(r["prompt"][0]["role"] == "user" and "messages" not in r for r in train)  # prompt-only
        assert not {r["prompt"][0]["content"] for r in train} & held_out
    # without the reservation the same draws would have held held-out prompts: the check above can fail
    rng = random.Random(spec.data_seed)
    plain = set()
    for _ in range(2000):
        plain.add(C.draw(rng, rng.choice(C.KINDS))[0])
    assert plain & held_out


def _digest(records: list[dict]) -> str:
    text = "\n".join(json.dumps(r, sort_keys=True) for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_generated_data_depends_only_on_the_task_seeds():
    a = cfg()
    # the digit fields do not apply: changing them changes nothing
    digits = dataclasses.replace(a, train_digits=(7,), eval_digits=(3, 9), train_weights=(1.0,))
    for split in ("train", "eval", "test"):
        assert task_records(digits, split) == task_records(a, split)
    assert task_records(dataclasses.replace(a, test_seed=a.test_seed + 1), "test") != task_records(a, "test")
    assert task_records(dataclasses.replace(a, data_seed=7), "train") != task_records(a, "train")
    # pinned digests: the same in every process (a generator that used hash() would differ between
    # runs), and a change to the generators shows up here before it moves any run's data
    assert [_digest(task_records(a, split)) for split in ("train", "eval", "test")] == PINNED


def test_held_out_splits_that_would_use_up_a_kind_are_refused_with_a_message():
    # lowercase (the first kind with one parameter) has 5 requests x 100 topics = 500 prompts; 2 validation
    # and 300 test prompts are more than half: training could barely draw one
    with pytest.raises(DataError, match=r"task:constraints/test: .*'lowercase'.*task\.test_per_bucket"):
        load_records(DataConfig(), cfg(test_per_bucket=300), "test")


# ---- scoring and the rule --------------------------------------------------------------------------------


def test_score_counts_per_kind_by_hand():
    q_max = C.prompt_of(C.REQUESTS[0], "coffee", "max_words", 5)
    q_low = C.prompt_of(C.REQUESTS[1], "rain", "lowercase", None)
    questions = [q_max, q_max, q_low, q_low]
    answers = [C.answer_of("max_words", 5), C.answer_of("max_words", 5)] + [C.answer_of("lowercase", None)] * 2
    responses = ["Coffee is warm.", "Coffee is a warm morning drink.", "rain is wet.", "Rain is wet."]
    report = score_generations("constraints", questions, answers, responses)
    # max_words: 3 words ok, 6 words not -> 0.5; lowercase: ok, "Rain" not -> 0.5;
    # per kind sqrt(0.25 / 2) = 0.3536; overall stratified sqrt(2 · 0.25 + 2 · 0.25) / 4 = 0.25
    # words 3 + 6 + 3 + 3 = 15 -> 3.75; characters 15 + 31 + 12 + 12 = 70 -> 17.5
    assert report == {
        "task": "constraints",
        "accuracy": 0.5,
        "stderr": 0.25,
        "accuracy_by_kind": {"lowercase": 0.5, "max_words": 0.5},
        "stderr_by_kind": {"lowercase": 0.3536, "max_words": 0.3536},
        "n_by_kind": {"lowercase": 2, "max_words": 2},
        "n": 4,
        "mean_words": 3.75,
        "mean_chars": 17.5,
    }


def test_rule_reward_is_the_checker():
    q = C.prompt_of(C.REQUESTS[2], "a map", "start_word", "Well")
    assert RULES["constraint_met"]([q, q, "no constraint here"], ["Well, fold it.", "Fold it.", "Well"]) == [
        1.0,
        0.0,
        0.0,
    ]


# ---- what the task refuses and declares ------------------------------------------------------------------


def test_pairs_are_refused_and_the_task_is_not_imitable():
    with pytest.raises(ValueError, match=r"generates no pairs.*stage2_label"):
        task_preference_records(cfg(), None, 10, "train")
    task = TASKS["constraints"]
    assert not task.imitable and task.wrong_kinds == () and task.answer_tokens(cfg()) == 64
    assert all(t.imitable for name, t in TASKS.items() if name != "constraints")


def test_fewshot_and_other_languages_are_refused():
    sft = ROOT / "configs/tiny/sft.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, sft, ["task.name=constraints", "task.fewshot=true"])
    assert err.value.key == "task.fewshot"
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, sft, ["task.name=constraints", "task.prompt_language=fr"])
    assert err.value.key == "task.prompt_language"


def test_sft_on_the_constraints_task_without_data_is_refused_with_where_its_data_comes_from():
    # the task's training records hold no reference text: SFT on them would learn the constraint's JSON
    cfg = load_config(SFTStageConfig, None, ["task.name=constraints", "task.train_size=8", "task.test_per_bucket=50"])
    with pytest.raises(DataError, match=r"data.train.*no reference answers to train on.*best.jsonl"):
        load_records(cfg.data, cfg.task, "train")
    # PPO and the label stage draw its prompts (with their own offsets) as before
    records, _ = load_records(cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", 20))
    assert len(records) == 8 and "answer" in records[0].data
