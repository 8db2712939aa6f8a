"""Stage 1 through its real entry point on a test-sized model: the loss falls, the output loads
with plain transformers and answers the seed's prompts the way eval.json says, LoRA outputs
reload, and bad data stops with one line naming file, line and field."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_entry
from rlhf.tasks import subtraction as S
from rlhf.tracking import read_metrics

# slow: every test runs stage 1's entry point
pytestmark = pytest.mark.slow

FAST = [
    "model=tiny-llama",
    "task.train_size=2000",
    "task.eval_size=40",
    "task.test_per_bucket=20",
    "train.batch_size=32",
    "optim.lr=3e-3",
    "optim.warmup_ratio=0",
    "train.log_every=5",
    "tracking.report_to=[]",
    "tracking.progress=false",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "out"
    result = run_entry("launch/stage1_sft.py", *FAST, "train.max_steps=60", "train.save_every=30", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_loss_falls_and_outputs_are_complete(sft_run):
    losses = [r["train/sft/loss"] for r in read_metrics(sft_run / "metrics.jsonl") if "train/sft/loss" in r]
    assert len(losses) >= 10 and losses[-1] < 0.7 * losses[0]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json", "eval.json", "config.yaml"):
        assert (sft_run / name).is_file(), name
    manifest = json.loads((sft_run / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["finished"] and manifest["config_hash"]
    assert {"torch", "transformers", "trl"} <= set(manifest["versions"])
    assert (sft_run / "checkpoints" / "checkpoint-30" / "COMPLETE").is_file()


def test_plain_transformers_reload_agrees_with_eval_json(sft_run):
    report = json.loads((sft_run / "eval.json").read_text())
    assert report["task"] == "subtraction" and set(report["accuracy_by_digits"]) == {"2", "5"} and report["n"] == 40
    tokenizer = AutoTokenizer.from_pretrained(sft_run)
    model = AutoModelForCausalLM.from_pretrained(sft_run).eval()
    tokenizer.padding_side = "left"
    prompts = [s["prompt"] for s in report["samples"]]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answers == [s["response"] for s in report["samples"]]


def test_lora_run_saves_adapter_and_base_and_reloads(tmp_path):
    out = tmp_path / "lora"
    result = run_entry(
        "launch/stage1_sft.py",
        *FAST,
        "train.max_steps=8",
        "train.save_every=0",
        "lora.enabled=true",
        "lora.r=4",
        "lora.merge_on_save=true",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "base_model" / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    from rlhf.config import ModelInit
    from rlhf.registry import build_policy, load_tokenizer, resolve

    source = resolve(str(out))
    via_registry = build_policy(source, ModelInit(), load_tokenizer(source, ModelInit())).eval()
    ids = torch.tensor([[3, 417, 262, 263, 4]])
    assert torch.allclose(via_registry(ids).logits, merged.eval()(ids).logits, atol=1e-4)


def test_corrupt_data_is_one_line_error_with_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "请计算：1 - 2 = ", "answer": "-1"}\n{"prompt": "请计算：3 - 4 = "}\n', encoding="utf-8")
    result = run_entry("launch/stage1_sft.py", *FAST, f"data.train={bad}", f"output_dir={tmp_path / 'o'}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:2: field 'answer': missing")


def test_config_error_exits_2_naming_the_key(tmp_path):
    result = run_entry("launch/stage1_sft.py", "train.max_step=3")
    assert result.returncode == 2 and "train.max_step" in result.stderr and "did you mean" in result.stderr


def test_a_fresh_run_replaces_the_metrics_an_earlier_run_left(tmp_path):
    """Re-running a stage from scratch in the same directory must not leave the earlier run's
    curves in metrics.jsonl (the report and the dashboards read it)."""
    out = tmp_path / "o"
    for steps in (8, 4):
        result = run_entry(
            "launch/stage1_sft.py",
            *FAST,
            f"train.max_steps={steps}",
            "train.log_every=2",
            "train.save_every=0",
            f"output_dir={out}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    steps_logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/sft/loss" in r]
    assert steps_logged == [2, 4]


def test_data_that_the_length_limit_empties_is_one_line_error(tmp_path):
    # A new user's first try: seed 000's few-shot SFT lines (each ~300 tokens) under
    # configs/tiny/sft.yaml, whose data.max_length is 64. Every example is dropped; the trainer
    # used to stop with a raw `num_samples=0` traceback.
    data = tmp_path / "LLM_minus_SFT_train_data.jsonl"
    data.write_text("".join(json.dumps(S.sft_record(x, 2 * x + 7), ensure_ascii=False) + "\n" for x in range(20)))
    result = run_entry("launch/stage1_sft.py", *FAST, f"data.train={data}", f"output_dir={tmp_path / 'o'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.max_length: no training examples left: 20 of 20"), last
    assert "data.max_length=64" in last and "data.overlong=drop" in last
