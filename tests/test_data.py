"""SFT data: every file type and format is detected and normalised; bad input stops with one
line naming the file, the line and the field."""

import gzip
import json
import re

import pytest
from datasets import Dataset, DatasetDict

from rlhf.config import DataConfig, TaskConfig
from rlhf.data import DataError, load_records, normalize_preferences, normalize_sft, read_records
from rlhf.data.lengths import limit_length, warn_overlong

QUESTION = "请计算：52 - 17 = ，直接返回计算结果"
CANONICAL = {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": "35"}]}

SAME_ITEM_IN_EACH_FORMAT = {
    "messages": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "35"}]},
    "prompt_completion": {"prompt": QUESTION, "completion": "35"},
    "prompt_completion_chat": {
        "prompt": [{"role": "user", "content": QUESTION}],
        "completion": [{"role": "assistant", "content": "35"}],
    },
    "prompt_answer": {"prompt": QUESTION, "answer": "35"},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", sorted(SAME_ITEM_IN_EACH_FORMAT))
def test_every_chat_format_normalises_to_the_same_example(tmp_path, name):
    path = write_jsonl(tmp_path / "d.jsonl", [SAME_ITEM_IN_EACH_FORMAT[name]] * 2)
    examples, fmt = normalize_sft(read_records(path))
    assert fmt == name.replace("_chat", "")
    assert examples == [CANONICAL, CANONICAL]


def test_text_format(tmp_path):
    examples, fmt = normalize_sft(read_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])))
    assert fmt == "text" and examples == [{"text": "hello"}]


def test_multi_turn_chat_keeps_all_turns(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    examples, _ = normalize_sft(
        read_records(write_jsonl(tmp_path / "m.jsonl", [row, SAME_ITEM_IN_EACH_FORMAT["messages"]]))
    )
    assert all("messages" in e for e in examples) and len(examples[0]["messages"]) == 4


def test_json_parquet_and_saved_dataset(tmp_path):
    rows = [SAME_ITEM_IN_EACH_FORMAT["prompt_answer"]] * 3
    (tmp_path / "d.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("d.json", "d.parquet", "saved"):
        examples, fmt = normalize_sft(read_records(str(tmp_path / source)))
        assert fmt == "prompt_answer" and examples == [CANONICAL] * 3, source


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "answer": "1"},\n {"prompt": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'answer': missing"):
        normalize_sft(read_records(str(path)))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "q", "answer": "1"', "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "q"}', "field 'answer': missing"),
        ('{"prompt": "", "answer": "1"}', "field 'prompt': empty"),
        ('{"prompt": "q", "answer": null}', "field 'answer': missing"),
        ('{"prompt": 3, "answer": "1"}', "field 'prompt': expected a string or a list of messages, got int"),
        ('{"prompt": [{"role": "robot", "content": "x"}], "answer": "1"}', "field 'prompt[0].role'"),
        ('{"prompt": [{"role": "user", "content": "  "}], "answer": "1"}', "field 'prompt[0].content': empty"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        normalize_sft(read_records(str(path)))
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_unknown_format_and_missing_files(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(DataError, match="cannot tell the SFT format"):
        normalize_sft(read_records(path))
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(str(tmp_path / "x.csv"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(str(tmp_path / "bin.jsonl"))


def test_generated_task_data_when_paths_are_null():
    task = TaskConfig(name="subtraction", train_size=50, eval_size=20, eval_digits=(2, 5))
    train, label = load_records(DataConfig(), task, "train")
    assert label == "task:subtraction/train" and len(train) == 50
    evals, _ = load_records(DataConfig(), task, "eval")
    examples, fmt = normalize_sft(evals)
    assert fmt == "prompt_answer" and len(examples) == 20
    # deterministic in data_seed
    assert [r.data for r in load_records(DataConfig(), task, "train")[0]] == [r.data for r in train]


def test_utf8_bom_is_accepted(tmp_path):
    # Windows editors (Notepad, Excel's "UTF-8" export) start the file with a byte-order mark.
    row = json.dumps(SAME_ITEM_IN_EACH_FORMAT["prompt_answer"], ensure_ascii=False)
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + (row + "\n").encode() * 2)
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + f"[{row},\n{row}]".encode())
    for name in ("d.jsonl", "d.json"):
        examples, fmt = normalize_sft(read_records(str(tmp_path / name)))
        assert fmt == "prompt_answer" and examples == [CANONICAL] * 2, name


def test_duplicate_key_names_line_and_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "answer": "1"}\n{"prompt": "q", "answer": "1", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: field 'answer': appears twice"):
        read_records(str(path))
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "q", "answer": "1"},\n{"prompt": "q",\n "prompt": "r", "answer": "1"}\n]')
    with pytest.raises(DataError, match=rf"^{path}:3: field 'prompt': appears twice"):
        read_records(str(path))


def test_deep_nesting_truncated_gzip_and_bad_byte_name_the_line(tmp_path):
    good = b'{"prompt": "q", "answer": "1"}\n'
    cases = {
        "deep.jsonl": good + b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        "byte.jsonl": good * 2 + b'{"prompt": "caf\xe9", "answer": "1"}\n',
        "deep.json": b"[\n" + good + b"," + b"[" * 100_000 + b"]" * 100_000 + b"\n]",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    # the first 3 lines of a 1,000-line file, cut mid-stream (an interrupted download)
    whole = gzip.compress(good * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all\n")
    expected = {
        "deep.jsonl": (2, "nested too deeply"),
        "byte.jsonl": (3, "not UTF-8 text (byte 0xe9"),
        "deep.json": (3, "nested too deeply"),
        "cut.jsonl.gz": (None, "truncated"),
        "junk.jsonl.gz": (1, "cannot read"),
    }
    for name, (line, words) in expected.items():
        path = tmp_path / name
        with pytest.raises(DataError) as err:
            read_records(str(path))
        text = str(err.value)
        assert "\n" not in text and words in text, text
        where = text.split(": ")[0]
        assert where.startswith(f"{path}:") and where[len(f"{path}:") :].isdigit(), text
        if line is not None:
            assert where == f"{path}:{line}", text
    with pytest.raises(DataError) as err:
        read_records(str(tmp_path / "cut.jsonl.gz"))
    assert 1 < int(str(err.value).split(":")[1]) <= 1000  # the line where the data stops, after the complete ones


@pytest.mark.parametrize("source", ["my data/train", "train.gz", "./train", "~/train", "a/b/c"])
def test_a_missing_path_fails_at_once_without_asking_the_hub(source):
    with pytest.raises(DataError, match=r": no such file or directory$"):
        read_records(source)


@pytest.mark.parametrize(
    "row, field",
    [
        ('{"prompt": "q", "chosen": "1", "rejected": "2", "margin": NaN}', "margin"),
        ('{"prompt": "q", "chosen": "1", "rejected": "2", "margin": Infinity}', "margin"),
        (
            '{"prompt": "q", "responses": [{"text": "1", "score": 1}, {"text": "2", "score": NaN}]}',
            "responses[1].score",
        ),
    ],
)
def test_nan_margin_or_score_names_file_line_and_field(tmp_path, row, field):
    # Python's json module reads NaN / Infinity (other tools write them); a NaN margin makes the
    # loss NaN, a NaN score sorts anywhere and the ranking is lost.
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "chosen": "1", "rejected": "2"}\n' + row + "\n")
    if "responses" in row:
        path.write_text('{"prompt": "q", "responses": ["1", "2"]}\n' + row + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field '{re.escape(field)}': must be a finite"):
        normalize_preferences(read_records(str(path)))


@pytest.mark.parametrize("mode", ["drop", "truncate"])
def test_a_length_limit_that_leaves_nothing_says_so(mode):
    rows = [{"input_ids": [1] * 10, "labels": [-100] * 8 + [5, 6]}] * 4
    with pytest.raises(DataError) as err:
        limit_length(Dataset.from_list(rows), 6, mode)
    text = str(err.value)
    assert text.startswith("data.max_length: no training examples left: 4 of 4") and f"data.overlong={mode}" in text
    short = {"input_ids": [1] * 4, "labels": [-100, -100, 5, 6]}
    kept, over = limit_length(Dataset.from_list([*rows, short]), 6, mode)
    assert over == 4 and len(kept) == 1  # truncated to 6 tokens, the long ones have no trained token left


def test_every_stage_warns_of_overlong_training_data_in_one_line(caplog):
    warn_overlong(0, 10, "pairs", 128, "drop")
    assert not caplog.records
    warn_overlong(3, 10, "pairs", 128, "drop")
    warn_overlong(2, 5, "examples", 64, "truncate")
    assert [r.getMessage() for r in caplog.records] == [
        "3 of 10 training pairs longer than data.max_length=128 were dropped",
        "2 of 5 training examples longer than data.max_length=64 were truncated",
    ]


def test_a_numeric_answer_reaches_ppo_and_label_prompts_as_text():
    # SFT stringifies `"answer": 42`; PPO and the label stage read it as None, so the checker
    # never scored those prompts (gold accuracy and rule rewards silently left them out).
    from rlhf.data.io import Record
    from rlhf.data.prompts import normalize_prompts

    rows = normalize_prompts(
        [
            Record({"prompt": "7 - 3 = ", "answer": 4}, "t:1"),
            Record({"prompt": "1 - 3 = ", "answer": -2.5}, "t:2"),
            Record({"prompt": "x", "completion": True}, "t:3"),
        ]
    )
    assert [r["answer"] for r in rows] == ["4", "-2.5", None]
