"""Your own reward functions (a reward source `{kind: function, function: "module:function"}`): the
prompt rows' other fields reach them, the subtraction checker is one of them, a config naming a
function loads without importing it, one that cannot be imported is refused when the stage starts,
before any model loads, and one that returns nonsense stops the run naming it."""

import json
import random

import pytest
from accelerate import Accelerator
from test_ppo_stage import FAST  # the stage tests' fast settings

from conftest import ROOT, run_entry
from rlhf.config import ConfigError, PPOStageConfig, load_config
from rlhf.data.io import Record
from rlhf.data.prompts import normalize_prompts
from rlhf.reward_functions import RewardFunctionError, call_reward_function, row_fields
from rlhf.tasks.subtraction import (
    PROMPT,
    digits_reward,
    exact_reward,
    parse_question,
    subtraction_digits,
    subtraction_exact,
)
from rlhf.tracking import read_metrics
from stages.ppo.rewards import SourceContext, build_sources

CALLS: list[dict] = []  # what `difficulty_reward` was given, step by step (the in-process PPO run)


def difficulty_reward(prompts, responses, answer, difficulty, note, **fields):
    """A reward that reads two of the rows' own fields: the operand's digit count, and a note that
    only some rows carry."""
    CALLS.append({"prompts": prompts, "answer": answer, "difficulty": difficulty, "note": note})
    return [float(d) + 0.5 * (n is not None) for d, n in zip(difficulty, note, strict=True)]


def short(prompts, responses, **fields):
    return [1.0] * (len(responses) - 1)


def nan(prompts, responses, **fields):
    return [float("nan")] * len(responses)


def text(prompts, responses, **fields):
    return ["1.0"] * len(responses)


def boom(prompts, responses, **fields):
    raise KeyError("tests")


def test_prompt_rows_keep_their_other_fields():
    rows = normalize_prompts(
        [
            Record({"prompt": "q1", "answer": "1", "tests": ["assert f() == 1"], "id": 7}, "f:1"),
            Record({"prompt": "q2", "completion": "2", "meta": {"source": "x"}}, "f:2"),
            Record({"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "3"}]}, "f:3"),
        ]
    )
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "q1"}],
        "answer": "1",
        "tests": ["assert f() == 1"],
        "id": 7,
    }
    assert rows[1] == {"prompt": [{"role": "user", "content": "q2"}], "answer": "2", "meta": {"source": "x"}}
    assert rows[2] == {"prompt": [{"role": "user", "content": "q3"}], "answer": "3"}
    # as keyword lists: a row without a field gives None there
    assert row_fields(rows) == {
        "answer": ["1", "2", "3"],
        "tests": [["assert f() == 1"], None, None],
        "id": [7, None, None],
        "meta": [None, {"source": "x"}, None],
    }


def test_the_subtraction_functions_equal_the_rules():
    questions = [PROMPT % (52, 17), PROMPT % (3, 40), PROMPT % (1000, 1), "no question here"]
    responses = ["35", "-37", "909", "35"]
    prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": q}] for q in questions]
    # by hand: 52-17=35 right; 3-40=-37 right; 1000-1=999 vs "909": 2 of 3 characters right; no question: 0
    assert exact_reward(prompts, responses, answer=[None] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert exact_reward(prompts, responses) == subtraction_exact(questions, responses)
    assert digits_reward(prompts, responses) == pytest.approx([1.0, 1.0, 2 / 3, 0.0])
    assert digits_reward(prompts, responses) == subtraction_digits(questions, responses)


def _function_source(spec: str) -> PPOStageConfig:
    return load_config(
        PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [f'reward.sources.mine={{kind: function, function: "{spec}"}}']
    )


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("rlhf.tasks.subtraction:no_such_function", "has no 'no_such_function'"),
        ("rlhf.tasks.subtraction:PROMPT", "is not callable"),
    ],
)
def test_a_function_is_imported_when_the_stage_starts_not_when_the_config_loads(spec, says):
    cfg = _function_source(spec)  # loads: the config checks only the spec's form, importing nothing
    assert cfg.reward.sources["mine"].function == spec
    with pytest.raises(ConfigError) as e:  # the stage's start (stages/ppo/models.py builds them first)
        build_sources(cfg.reward, SourceContext(accelerator=Accelerator(cpu=True)))
    assert "config key 'reward.sources.mine.function'" in str(e.value) and says in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_a_function_spec_of_the_wrong_form_is_refused_by_the_config():
    with pytest.raises(ConfigError) as e:
        _function_source("rlhf.tasks.subtraction")
    assert "reward.sources.mine.function': expected 'package.module:function'" in str(e.value)


@pytest.mark.slow
def test_the_stage_refuses_an_unimportable_function_before_loading_anything(tmp_path):
    result = run_entry(
        "launch/stage3_ppo.py",
        "policy=no/such/policy",
        'reward.sources.mine={kind: function, function: "my_rewards:correct"}',
        f"output_dir={tmp_path / 'ppo'}",
        timeout=600,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "reward.sources.mine.function" in last and "cannot import 'my_rewards'" in last, last
    assert not (tmp_path / "ppo").exists()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("short", "returned 2 scores for 3 responses"),
        ("nan", "returned nan at index 0, not finite"),
        ("text", "returned '1.0' at index 0, not a float"),
        ("boom", "raised KeyError: 'tests'"),
    ],
)
def test_a_function_returning_nonsense_is_an_error_naming_it(name, says):
    spec = f"test_reward_functions:{name}"
    with pytest.raises(RewardFunctionError) as e:
        call_reward_function(spec, [[{"role": "user", "content": "q"}]] * 3, ["a", "b", "c"], {"answer": [None] * 3})
    assert f"reward function {spec!r}" in str(e.value) and says in str(e.value)


@pytest.mark.slow
def test_reward_functions_score_a_ppo_run_with_the_rows_fields(tmp_path):
    """In a real (tiny, in-process) PPO run the function gets each prompt with its own row's
    fields, its weighted score is the sequence score, and each source is logged as train/reward/<name>."""
    import stages.ppo.train as ppo_train

    rng, rows = random.Random(0), []
    for i in range(64):
        x, y = rng.randrange(10, 10 ** rng.randint(2, 5)), rng.randrange(1, 100)
        row = {"prompt": PROMPT % (x, y), "answer": str(x - y), "difficulty": len(str(x))}
        rows.append({**row, "note": "hard"} if i % 2 else row)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "ppo"
    overrides = ["policy=tiny-llama", "reward_model=null", "reward.sources.rm=null"]
    overrides += ["reward.sources.subtraction={kind: rule, weight: 0.0}"]
    overrides += ['reward.sources.difficulty={kind: function, function: "test_reward_functions:difficulty_reward"}']
    overrides += ['reward.sources.exact={kind: function, function: "rlhf.tasks.subtraction:exact_reward", weight: 0}']
    overrides += ["reward.missing_eos_penalty=null", f"data.train={data}"]
    overrides += [*FAST, f"output_dir={out}", "train.max_steps=2", "train.save_every=0"]
    CALLS.clear()
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    assert len(CALLS) == 2
    for call in CALLS:
        columns = (call[k] for k in ("prompts", "answer", "difficulty", "note"))
        for prompt, answer, difficulty, note in zip(*columns, strict=True):
            x, y = parse_question(prompt[-1]["content"])
            row = next(r for r in rows if r["prompt"] == PROMPT % (x, y))
            assert (answer, difficulty, note) == (str(x - y), len(str(x)), row.get("note"))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/score" in r]
    assert len(records) == 2
    for record, call in zip(records, CALLS, strict=True):
        expected = sum(d + 0.5 * (n is not None) for d, n in zip(call["difficulty"], call["note"], strict=True))
        assert record["train/reward/difficulty"] == pytest.approx(expected / 16)
        assert record["train/ppo/score"] == pytest.approx(expected / 16)  # weight 1; the others weigh 0
        assert record["train/reward/exact"] == record["train/reward/subtraction"]
