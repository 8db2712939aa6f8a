"""Stage 2 through its real entry point: a reward model that learns to rank the right difference
above wrong ones and reloads with plain transformers; every example preference file trains as is."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, run_entry
from rlhf.config import ModelInit, RMStageConfig, load_config
from rlhf.registry import build_scalar_model, load_tokenizer, resolve
from rlhf.registry.models import ModelSource
from rlhf.tasks.subtraction import PROMPT
from stages.reward.train import train


@pytest.mark.slow
def test_reward_model_learns_and_reloads_with_auto_class(tmp_path):
    out = tmp_path / "rm"
    result = run_entry(
        "launch/stage2_rm.py",
        "model=tiny-llama",
        f"output_dir={out}",
        "pairs.kinds=[sign_error, dropped_digit]",
        "pairs.train_size=4000",
        "pairs.eval_size=200",
        "pairs.onpolicy_fraction=0",
        "train.max_steps=150",
        "train.batch_size=32",
        "optim.lr=3e-3",
        "optim.warmup_ratio=0",
        "task.train_digits=[2]",
        "task.train_weights=null",
        "task.eval_digits=[2]",
        "tracking.report_to=[]",
        "tracking.progress=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] >= 0.8 and set(report["accuracy_by_kind"]) == {"sign_error", "dropped_digit"}
    assert len(report["scores"]["chosen"]) == report["n"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    prompt = [{"role": "user", "content": PROMPT % (52, 17)}]
    texts = [
        tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": a}], tokenize=False)
        for a in ("35", "-35", "5")
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        right, sign, dropped = model(**batch).logits.squeeze(-1).tolist()
    assert right > sign and right > dropped


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "data" / "examples").glob("pairs_*.jsonl")), ids=lambda p: p.stem)
def test_every_preference_format_trains_as_is(path, tmp_path):
    metrics = train(_rm_on_file(path, tmp_path, "train.max_steps=2", "train.batch_size=4"))
    manifest = json.loads(Path(tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["finished"] and metrics["n"] > 0


def _rm_on_file(path, tmp_path, *overrides: str) -> RMStageConfig:
    """The tiny RM config trained and evaluated on one pairs file, no checkpoints, no tracking."""
    return load_config(
        RMStageConfig,
        ROOT / "configs/tiny/rm.yaml",
        [
            "model=tiny-llama",
            f"data.train={path}",
            f"data.eval={path}",
            f"output_dir={tmp_path / 'rm'}",
            "train.save_every=0",
            "tracking.report_to=[]",
            "tracking.progress=false",
            "pairs.onpolicy_fraction=0",
            *overrides,
        ],
    )


def _pair(x: int, y: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": PROMPT % (x, y)}],
        "chosen": [{"role": "assistant", "content": str(x - y)}],
        "rejected": [{"role": "assistant", "content": "0"}],
    }


def test_onpolicy_mining_never_mines_a_cut_off_answer(caplog):
    """Issue 14 item 11: an answer cut off at the sampling budget is never mined as "rejected".
    The 20-digit bucket's right answer 77777777777777777778 − 1 = 77777777777777777777 (20 tokens)
    against a model that writes 7s and never stops: mining used to sample 16 tokens and mine
    "7777777777777777" as the wrong answer; now it samples 20 + 1 (sign) + 4 (slack) + 1 (end of
    turn) = 26 tokens, the answer is still going, and it is dropped and counted. A finished wrong
    answer is still mined, a finished right one is not."""
    from scripted_model import bigram_policy

    from rlhf.precision import resolve_precision
    from rlhf.registry import build_tiny_tokenizer, prepare_tokenizer
    from stages.reward.pairs import mine_pairs, mining_max_new_tokens

    cfg = load_config(
        RMStageConfig,
        ROOT / "configs/tiny/rm.yaml",
        ["task.train_digits=[20]", "task.train_weights=null", "pairs.onpolicy_samples=2"],
    )
    assert mining_max_new_tokens(cfg.task) == 26
    tokenizer = prepare_tokenizer(build_tiny_tokenizer())
    precision = resolve_precision(cfg.model_init)

    never_stops = bigram_policy(tokenizer, {"<|assistant|>": "7", "7": "7"})
    with caplog.at_level("INFO", logger="rlhf.pairs"):
        mined = mine_pairs(never_stops, tokenizer, [_pair(77777777777777777778, 1)], 4, cfg, precision)
    assert mined == []
    assert "2 cut off at 26 tokens" in caplog.text

    answers_minus_one = bigram_policy(tokenizer, {"<|assistant|>": "-", "-": "1", "1": "<|end|>"})
    mined = mine_pairs(answers_minus_one, tokenizer, [_pair(1, 2), _pair(2, 7)], 4, cfg, precision)
    assert [(p["prompt"][0]["content"], p["rejected"][0]["content"]) for p in mined] == [(PROMPT % (2, 7), "-1")]


@pytest.mark.slow
def test_rm_logs_the_tokens_it_trained_on(tmp_path):
    """train/rm/num_tokens counts the real (unpadded) tokens of every chosen and rejected sequence
    trained on, as SFT's train/sft/num_tokens does: the throughput figure of tools/smoke_real_shape.py.
    One step over all 7 example pairs sees each sequence once."""
    path = ROOT / "data" / "examples" / "pairs_prompt.jsonl"
    train(
        _rm_on_file(
            path, tmp_path, "train.max_steps=1", "train.batch_size=7", "train.log_every=1", "train.eval_every=0"
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    expected = sum(
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}], return_dict=True
            )["input_ids"]
        )
        for p in pairs
        for a in (p["chosen"], p["rejected"])
    )  # <|user|> prompt <|assistant|> answer <|end|>, chosen and rejected rows alike
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train/rm/num_tokens"] for r in records if "train/rm/num_tokens" in r]
    assert logged == [expected]


@pytest.mark.slow
def test_a_lora_rm_on_a_lora_sft_reloads_as_trained(tmp_path):
    """LoRA on LoRA: the RM starts from the SFT model (its adapter merged into the base) and saves
    only its own adapter. Reloaded from the adapter it must be that model, not the bare base with
    the RM's adapter (which scored SmolLM2's held-out pairs 0.62 where training read 0.80)."""
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    common = ("lora.enabled=true", "lora.r=4", "tracking.report_to=[]", "tracking.progress=false", "train.save_every=0")
    result = run_entry(
        "launch/stage1_sft.py", "model=tiny-llama", "task.train_size=256", "task.eval_size=8",
        "task.test_per_bucket=4", "train.max_steps=6", "train.batch_size=8", "optim.lr=2e-2",
        "evaluate_base=false", f"output_dir={sft}", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_entry(
        "launch/stage2_rm.py", f"model={sft}", "pairs.train_size=64", "pairs.eval_size=16",
        "pairs.onpolicy_fraction=0", "train.max_steps=3", "train.batch_size=8", "lora.merge_on_save=true",
        f"output_dir={rm}", *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    init = ModelInit()
    merged = resolve(str(rm))  # merged/: built from the SFT model with this adapter, as trained
    assert merged.path == str(rm / "merged")
    (rm / "merged").rename(tmp_path / "merged-aside")
    adapter = resolve(str(rm))  # the adapter alone, as a run without lora.merge_on_save leaves it
    assert adapter.adapter == str(rm)
    ids = torch.tensor([[3, 417, 262, 263, 4], [3, 301, 262, 290, 4]])
    scores = []
    for source in (merged, adapter):
        if source is merged:
            source = ModelSource(source.name, str(tmp_path / "merged-aside"), source.preset)
        model = build_scalar_model(source, init, load_tokenizer(source, init)).eval()
        with torch.no_grad():
            scores.append(model(ids).logits.squeeze(-1))
    assert torch.allclose(scores[0], scores[1], atol=1e-4), scores
