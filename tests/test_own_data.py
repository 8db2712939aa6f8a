"""Data the way users have it: columns under other names, several files mixed by weight, a saved
Hugging Face dataset, a hub id while offline, chat messages with a system turn, and a chat
template of one's own; bad input stops with one line naming file, line and field."""

import json
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from conftest import ROOT
from rlhf.cli import parse
from rlhf.config import ConfigError, DataConfig, ModelInit, SFTStageConfig, TaskConfig
from rlhf.data import DataError, load_records, normalize_preferences, normalize_sft, read_records
from rlhf.registry import load_tokenizer, resolve

NO_TASK = TaskConfig(name=None)
COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_columns_map_onto_the_preference_fields(tmp_path):
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "id": i} for i in range(3)]
    data = DataConfig(train=write_jsonl(tmp_path / "mine.jsonl", rows), columns=COLUMNS)
    records, _ = load_records(data, NO_TASK, "train")
    pairs, fmt, _ = normalize_preferences(records)
    assert fmt == "prompt" and len(pairs) == 3
    assert pairs[1]["prompt"] == [{"role": "user", "content": "q1"}]
    assert pairs[1]["chosen"][0]["content"] == "g1" and pairs[1]["rejected"][0]["content"] == "b1"


def test_the_columns_override_parses_and_a_missing_column_names_file_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "good": "g", "bad": "b"}, {"question": "q"}])
    cfg, _ = parse(
        SFTStageConfig, None, [f"data.train={path}", "data.columns={prompt: question, chosen: good, rejected: bad}"]
    )
    assert cfg.data.columns == COLUMNS
    with pytest.raises(DataError) as e:
        load_records(cfg.data, cfg.task, "train")
    assert str(e.value) == f"{path}:2: field 'good': missing (data.columns maps it to 'chosen')"
    with pytest.raises(ConfigError, match=r"data\.columns\.question"):
        parse(SFTStageConfig, None, ["data.columns={question: prompt}"])  # the map goes field -> column


def test_several_files_mix_by_weight(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(2)])
    cfg, _ = parse(SFTStageConfig, None, [f"data.train=[{a}, {b}]", "data.train_weights=[0.5, 2]"])
    records, label = load_records(cfg.data, cfg.task, "train")
    texts = [r.data["text"] for r in records]
    # 0.5 of a's 4 records: a fixed two of them, in file order; 2 of b: each of b's twice
    assert len(texts) == 6 and texts[2:] == ["b0", "b1", "b0", "b1"]
    assert len(set(texts[:2])) == 2 and all(t.startswith("a") for t in texts[:2])
    assert texts == [r.data["text"] for r in load_records(cfg.data, cfg.task, "train")[0]]  # the same every run
    assert label == f"{a} + {b}"
    with pytest.raises(ConfigError, match=r"'data\.train_weights': needs one weight per data\.train source \(2\)"):
        parse(SFTStageConfig, None, [f"data.train=[{a}, {b}]", "data.train_weights=[1]"])


def test_a_saved_dataset_with_its_own_column_names_loads_by_split(tmp_path):
    rows = {"question": ["q0", "q1"], "good": ["g0", "g1"], "bad": ["b0", "b1"]}
    DatasetDict(
        {"train": Dataset.from_dict(rows), "test": Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
    ).save_to_disk(tmp_path / "saved")
    data = DataConfig(train=str(tmp_path / "saved"), eval=str(tmp_path / "saved"), columns=COLUMNS)
    train, _ = load_records(data, NO_TASK, "train")
    held_out, _ = load_records(data, NO_TASK, "eval")  # data.eval_split: test
    assert [p["chosen"][0]["content"] for p in normalize_preferences(train)[0]] == ["g0", "g1"]
    assert len(held_out) == 1 and held_out[0].where == f"{tmp_path / 'saved'}[test] row 1"


def test_a_hub_id_while_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        read_records("no-such-org/no-such-dataset", "train", "main")
    message = str(e.value)
    assert "\n" not in message and message.startswith("no-such-org/no-such-dataset[main]: ")
    assert "the hub is offline" in message and "save_to_disk" in message


def test_a_system_turn_is_kept_and_rendered(tmp_path):
    chat = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    sft, _ = normalize_sft(read_records(write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat}])))
    assert sft[0]["prompt"][0] == chat[0] and sft[0]["completion"] == chat[2:]
    pairs_file = write_jsonl(
        tmp_path / "pairs.jsonl", [{"chosen": chat, "rejected": [*chat[:2], {"role": "assistant", "content": "Hi"}]}]
    )
    pairs, fmt, _ = normalize_preferences(read_records(pairs_file))
    assert fmt == "chat" and pairs[0]["prompt"] == chat[:2]
    tokenizer = load_tokenizer(resolve("tiny-llama"), ModelInit())
    assert "Answer in French." in tokenizer.apply_chat_template(sft[0]["prompt"], tokenize=False)


TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_the_chat_template_override_is_used_from_a_string_or_a_file(tmp_path):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    for value in (TEMPLATE, str(tmp_path / "t.jinja")):
        cfg, _ = parse(SFTStageConfig, None, [f"model_init.chat_template={json.dumps(value)}"])
        tokenizer = load_tokenizer(resolve("tiny-llama"), cfg.model_init)
        assert (
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == "[system]S[user]U[assistant]"
        )
    with pytest.raises(ConfigError, match=r"model_init\.chat_template.*neither a file nor a Jinja template"):
        parse(SFTStageConfig, None, [f"model_init.chat_template={tmp_path / 'missing.jinja'}"])


@pytest.mark.slow
def test_sft_on_mixed_sources_with_mapped_columns_and_a_template(tmp_path):
    """Through the real entry point, no --config: a jsonl and a saved dataset with other column names,
    mixed, a system turn, the template from a file; the output's tokenizer carries the template."""
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"question": f"{i} + 1 =", "reply": f"{i + 1}"} for i in range(8)])
    Dataset.from_dict({"question": ["2 + 2 ="], "reply": ["4"]}).save_to_disk(tmp_path / "saved")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    out = tmp_path / "out"
    args = [
        "model=tiny-llama",
        f"data.train=[{jsonl}, {tmp_path / 'saved'}]",
        "data.train_weights=[0.5, 3]",
        "data.columns={prompt: question, completion: reply}",
        f"model_init.chat_template={tmp_path / 't.jinja'}",
        "train.max_steps=2",
        "train.batch_size=4",
        "tracking.report_to=[]",
        "tracking.progress=false",
        f"output_dir={out}",
    ]
    cmd = [sys.executable, str(ROOT / "launch/stage1_sft.py"), *args]  # no --config: the generic defaults
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"train: 7 examples from {jsonl} + {tmp_path / 'saved'}" in result.stderr  # 4 + 3
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
