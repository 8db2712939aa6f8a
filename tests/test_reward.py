"""Stage 2's loss against hand-computed values and against TRL's RewardTrainer; preference
formats that mean the same pairs normalise to the same examples."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import RewardConfig, RewardTrainer

from rlhf.config import ConfigError, ModelInit, RMStageConfig, load_config
from rlhf.data import DataError, normalize_preferences, read_records
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve
from stages.reward.loss import pair_accuracy, pairwise_loss, response_lm_loss
from stages.reward.pairs import preference_pairs
from stages.reward.train import PairwiseRewardTrainer, encode_pairs, train

ROOT = Path(__file__).resolve().parents[1]


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # diffs [1, -1]: -log sigmoid(1) = 0.31326, -log sigmoid(-1) = 1.31326; mean 0.81326
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(0.813262, abs=1e-5)
    # margin [0.5, 0]: diffs [0.5, -1]: -log sigmoid(0.5) = 0.474077; mean (0.474077 + 1.313262) / 2
    margin = torch.tensor([0.5, 0.0])
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(0.893670, abs=1e-5)
    # centering 0.01 * mean((2+1)^2, (0+1)^2) = 0.01 * 5 = 0.05 on top
    assert pairwise_loss(chosen, rejected, center_coef=0.01).item() == pytest.approx(0.863262, abs=1e-5)
    assert pair_accuracy(chosen, rejected).item() == 0.5
    # stays finite for huge gaps
    assert math.isfinite(pairwise_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item())


def test_loss_equals_trl_reward_trainer_on_the_same_batch(tmp_path):
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    model = build_scalar_model(source, ModelInit(), tokenizer, seed=0)
    pairs = [
        {
            "prompt": [{"role": "user", "content": "请计算：12 - 3 = ，直接返回计算结果"}],
            "chosen": [{"role": "assistant", "content": "9"}],
            "rejected": [{"role": "assistant", "content": "-9"}],
            "margin": 0.5,
        },
        {
            "prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}],
            "chosen": [{"role": "assistant", "content": "35"}],
            "rejected": [{"role": "assistant", "content": "45"}],
            "margin": 0.0,
        },
    ]
    rows = encode_pairs(tokenizer, pairs, use_margin=True)
    args = RewardConfig(
        output_dir=str(tmp_path),
        report_to="none",
        center_rewards_coefficient=0.01,
        max_length=None,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,  # TRL turns bf16 on by default; this compares fp32 losses
    )
    ours = PairwiseRewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = ours.data_collator(rows)
    model.eval()
    theirs_loss = RewardTrainer.compute_loss(ours, model, dict(batch))
    ours_loss = ours.compute_loss(model, dict(batch))
    assert ours_loss.item() == pytest.approx(theirs_loss.item(), abs=1e-6)


def test_response_lm_loss_by_hand():
    # vocab 2, one row of 4 tokens [0, 1, 1, pad]; the response starts at index 2, so only token 2
    # (= 1, predicted from position 1) counts. Logits at position 1: [0, ln 3] -> p(1) = 3/4.
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0)])
    labels = torch.tensor([[0, 1, 1, -100]])
    assert response_lm_loss(logits, labels, torch.tensor([2])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # starting at 1 also counts token 1 (= 1, from position 0, uniform: ln 2); the mean of the two
    both = (-math.log(0.75) + math.log(2.0)) / 2
    assert response_lm_loss(logits, labels, torch.tensor([1])).item() == pytest.approx(both, abs=1e-6)
    # nothing left to predict: 0, not NaN
    assert response_lm_loss(logits, labels, torch.tensor([4])).item() == 0.0


def two_pairs() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": "请计算：12 - 3 = ，直接返回计算结果"}],
            "chosen": [{"role": "assistant", "content": "9"}],
            "rejected": [{"role": "assistant", "content": "-9"}],
        },
        {
            "prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}],
            "chosen": [{"role": "assistant", "content": "35"}],
            "rejected": [{"role": "assistant", "content": "4"}],
        },
    ]


def test_lm_regularised_loss_adds_the_causal_lm_loss_of_the_chosen_responses(tmp_path):
    """With lm_coef, the RM's loss is the pairwise loss plus lm_coef times the loss that the same
    weights, loaded as a causal LM, give the chosen responses (prompt tokens and pads excluded)."""
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    sft = resolve(str(tmp_path / "sft"))
    model = build_scalar_model(sft, ModelInit(), tokenizer, seed=0)
    rows = encode_pairs(tokenizer, two_pairs(), use_margin=False)
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=None, use_cpu=True, bf16=False)
    trainers = [
        PairwiseRewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, lm_coef=c
        )
        for c in (0.0, 0.5)
    ]
    batch = trainers[0].data_collator(rows)
    answers = ["9", "35"]  # one token per digit, then EOS
    starts = [len(r["chosen_ids"]) - len(a) - 1 for r, a in zip(rows, answers, strict=True)]
    assert batch["response_start"].tolist() == starts
    model.train()  # the LM term is a training loss; dropout is 0 in the tiny configs
    plain, regularised = (t.compute_loss(model, dict(batch)).item() for t in trainers)

    causal = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    n_tokens, total = 0, 0.0
    for row in rows:
        ids = torch.tensor([row["chosen_ids"]])
        labels = ids.clone()
        labels[0, : row["response_start"]] = -100
        count = len(row["chosen_ids"]) - row["response_start"]
        total += causal(input_ids=ids, labels=labels).loss.item() * count
        n_tokens += count
    assert regularised - plain == pytest.approx(0.5 * total / n_tokens, abs=1e-5)


def test_lm_loss_needs_tied_embeddings(tmp_path):
    overrides = ["model=tiny-mistral", f"output_dir={tmp_path / 'rm'}", "loss.lm_coef=1", "tracking.report_to=[]"]
    small = ["pairs.train_size=8", "pairs.eval_size=4", "pairs.onpolicy_fraction=0", "train.max_steps=1"]
    cfg = load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", overrides + small)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        train(cfg)


PAIR = {"q": "请计算：52 - 17 = ，直接返回计算结果", "good": "35", "bad": "45"}
CANONICAL = {
    "prompt": [{"role": "user", "content": PAIR["q"]}],
    "chosen": [{"role": "assistant", "content": "35"}],
    "rejected": [{"role": "assistant", "content": "45"}],
}
SAME_PAIR = {
    "prompt": {"prompt": PAIR["q"], "chosen": "35", "rejected": "45"},
    "query": {"query": PAIR["q"], "chosen": "35", "rejected": "45"},
    "hh": {
        "chosen": f"\n\nHuman: {PAIR['q']}\n\nAssistant: 35",
        "rejected": f"\n\nHuman: {PAIR['q']}\n\nAssistant: 45",
    },
    "chat": {
        "chosen": [{"role": "user", "content": PAIR["q"]}, {"role": "assistant", "content": "35"}],
        "rejected": [{"role": "user", "content": PAIR["q"]}, {"role": "assistant", "content": "45"}],
    },
    "chat_with_prompt": {
        "prompt": [{"role": "user", "content": PAIR["q"]}],
        "chosen": [{"role": "assistant", "content": "35"}],
        "rejected": [{"role": "assistant", "content": "45"}],
    },
    "ranked": {"prompt": PAIR["q"], "responses": ["35", "45"]},
    "ranked_scores": {"prompt": PAIR["q"], "responses": [{"text": "45", "score": 0.1}, {"text": "35", "score": 0.9}]},
}


def write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", sorted(SAME_PAIR))
def test_every_format_gives_the_same_pair(tmp_path, name):
    pairs, fmt, dropped = normalize_preferences(read_records(write(tmp_path, [SAME_PAIR[name]])))
    assert pairs == [CANONICAL] and not dropped
    assert fmt == {"chat_with_prompt": "prompt", "ranked_scores": "ranked"}.get(name, name)


def test_ranked_lists_expand_to_every_pair(tmp_path):
    row = {"prompt": "q", "responses": ["a", "b", "c", "d"]}
    pairs, _, _ = normalize_preferences(read_records(write(tmp_path, [row])))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]  # C(4, 2) = 6


def test_multi_turn_hh_prompt(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2-1?\n\nAssistant: 1"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2-1?\n\nAssistant: 3"
    pairs, _, _ = normalize_preferences(read_records(write(tmp_path, [{"chosen": chosen, "rejected": rejected}])))
    assert [m["role"] for m in pairs[0]["prompt"]] == ["user", "assistant", "user"]
    assert pairs[0]["chosen"][0]["content"] == "1" and pairs[0]["rejected"][0]["content"] == "3"


def test_margin_is_kept_and_bad_pairs_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "  "},
    ]
    pairs, _, dropped = normalize_preferences(read_records(write(tmp_path, rows)))
    assert len(pairs) == 1 and pairs[0]["margin"] == 2.0
    assert dropped == {"chosen equals rejected": 1, "empty text": 1}


def test_a_rounds_pairs_enter_training_extra_train_repeat_times(tmp_path):
    # 8 generated pairs + 2 round pairs x 3 = 14 training pairs; the held-out round pair once
    round_rows = [{"prompt": "q1", "chosen": "1", "rejected": "2"}, {"prompt": "q2", "chosen": "3", "rejected": "4"}]
    (tmp_path / "eval").mkdir()
    args = ["pairs.train_size=8", "pairs.eval_size=4", "pairs.onpolicy_fraction=0"]
    args += [f"pairs.extra_train=[{write(tmp_path, round_rows)}]"]
    args += [f"pairs.extra_eval=[{write(tmp_path / 'eval', [GOOD_PAIR])}]"]
    cfg = load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", [*args, "pairs.extra_train_repeat=3"])
    pairs = preference_pairs(cfg, None, None, None)  # no on-policy mining: no model needed
    prompts = [p["prompt"][-1]["content"] for p in pairs.train]
    assert len(pairs.train) == 14 and prompts.count("q1") == 3 and prompts.count("q2") == 3
    assert [p["prompt"][-1]["content"] for p in pairs.eval].count("q") == 1 and len(pairs.eval) == 5
    assert pairs.train_source.endswith("pairs.jsonl x3")
    once = preference_pairs(load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", args), None, None, None)
    assert len(once.train) == 10  # the default: each round pair once
    with pytest.raises(ConfigError, match="extra_train_repeat"):
        load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", [*args, "pairs.extra_train_repeat=0"])


GOOD_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
GOOD_RANKING = {"prompt": "q", "responses": ["a", "b"]}


@pytest.mark.parametrize(
    "first, row, field",
    [
        (GOOD_PAIR, {"prompt": "q", "chosen": "a"}, "rejected"),
        (GOOD_PAIR, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
        (GOOD_PAIR, {"prompt": "q", "chosen": ["x"], "rejected": "b"}, "chosen[0]"),
        (GOOD_RANKING, {"prompt": "q", "responses": ["only one"]}, "responses"),
        (GOOD_RANKING, {"prompt": "q", "responses": [{"text": "a", "score": "high"}, "b"]}, "responses[0].score"),
    ],
)
def test_malformed_pairs_name_file_line_and_field(tmp_path, first, row, field):
    path = write(tmp_path, [first, row])
    with pytest.raises(DataError) as err:
        normalize_preferences(read_records(path))
    assert str(err.value).startswith(f"{path}:2: field '{field}'")
