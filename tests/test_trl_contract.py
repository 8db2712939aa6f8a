"""The private members of TRL's trainers that our RM and DPO trainers override or write
(stages/reward/train.py, stages/dpo/train.py). TRL promises none of them, so pyproject pins TRL to
the minor version these tests pass on; on an upgrade, each failure names the member that moved and
what of ours depends on it. Tiny models, no training: a second or two."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import trl
import trl.trainer.utils as trl_utils
from datasets import Dataset
from packaging.requirements import Requirement
from transformers import TrainerCallback
from trl import DPOTrainer, RewardConfig, RewardTrainer

from rlhf.config import DPOStageConfig, ModelInit, load_config
from rlhf.distributed import process_state
from rlhf.hf_trainer import compact_fused_lm_head
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve
from stages.dpo.train import PairDPOTrainer, dpo_args, encode_dpo_pairs
from stages.reward.train import PairwiseRewardTrainer, encode_pairs

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "请计算：12 - 3 = ，直接返回计算结果"}],
        "chosen": [{"role": "assistant", "content": "9"}],
        "rejected": [{"role": "assistant", "content": "-9"}],
    },
    {
        "prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}],
        "chosen": [{"role": "assistant", "content": "35"}],
        "rejected": [{"role": "assistant", "content": "45"}],
    },
]


def changed(cls: type, member: str, ours: str, what: str) -> str:
    """The failure message: which private member of which TRL class, and what of ours relies on it."""
    return (
        f"trl {trl.__version__}: {cls.__name__}.{member} {what}; {ours} relies on it. Adapt {ours} to the new "
        f"TRL, then move the trl pin in pyproject.toml"
    )


def test_installed_trl_is_the_pinned_minor():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (spec,) = [Requirement(s) for s in re.findall(r'"(trl[<>=!~][^"]*)"', pyproject)]
    assert spec.specifier.contains(trl.__version__), (
        f"trl {trl.__version__} is installed, pyproject.toml pins {spec}: the private members checked here "
        f"were checked on the pinned minor only; run this file on the new one before moving the pin"
    )


class Logged(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def reward_trainer(tmp_path: Path) -> PairwiseRewardTrainer:
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    model = build_scalar_model(source, ModelInit(), tokenizer, seed=0)
    rows = encode_pairs(tokenizer, PAIRS, use_margin=False)
    args = RewardConfig(
        output_dir=str(tmp_path), report_to="none", max_length=None, per_device_train_batch_size=2, use_cpu=True
    )
    data = Dataset.from_list(rows)
    return PairwiseRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def test_reward_trainer_private_members(tmp_path):
    trainer = reward_trainer(tmp_path)
    ours = "PairwiseRewardTrainer (stages/reward/train.py)"
    for member in ("_signature_columns", "_metrics", "_total_train_tokens"):
        assert member in vars(trainer), changed(RewardTrainer, member, ours, "is no longer set in __init__")
    assert trainer._signature_columns is None, changed(
        RewardTrainer, "_signature_columns", ours, "no longer starts as None (filled lazily)"
    )
    assert set(trainer._metrics) == {"train", "eval"}, changed(
        RewardTrainer, "_metrics", ours, "is no longer {'train': ..., 'eval': ...} of lists"
    )

    # _set_signature_columns_if_needed: the columns our collator needs reach the batch (the
    # default would keep only the model's forward arguments and drop response_start)
    hook = changed(RewardTrainer, "_set_signature_columns_if_needed", ours, "no longer decides the columns kept")
    try:
        batch = next(iter(trainer.get_train_dataloader()))
    except ValueError as e:  # transformers' own columns (the forward's arguments) match none of ours
        pytest.fail(f"{hook} ({e})")
    assert "response_start" in batch, f"{hook} (response_start was dropped)"

    # _metrics and _total_train_tokens: what compute_loss writes there, TRL's log() averages and logs
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert trainer._total_train_tokens == int(batch["attention_mask"].sum()), changed(
        RewardTrainer, "_total_train_tokens", ours, "is not the running count of tokens trained on"
    )
    logged = Logged()
    trainer.add_callback(logged)
    trainer.log({"loss": 1.0})
    assert logged.logs and {"accuracy", "margin", "num_tokens"} <= set(logged.logs[-1]), changed(
        RewardTrainer, "_metrics", ours, "is no longer what log() averages into the logged metrics"
    )


def test_dpo_trainer_prepare_dataset_is_called_with_our_signature(tmp_path, monkeypatch):
    """PairDPOTrainer._prepare_dataset returns our pre-tokenised rows as they are: TRL must still
    route each dataset through it, with the arguments it overrides."""
    ours = "PairDPOTrainer (stages/dpo/train.py)"
    expected = ["self", "dataset", "processing_class", "args", "dataset_name"]
    got = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    assert got == expected, changed(DPOTrainer, "_prepare_dataset", ours, f"takes {got}, not {expected}")

    calls = []
    original = PairDPOTrainer._prepare_dataset

    def spy(self, dataset, processing_class, args, dataset_name):
        calls.append(dataset_name)
        return original(self, dataset, processing_class, args, dataset_name)

    monkeypatch.setattr(PairDPOTrainer, "_prepare_dataset", spy)
    cfg = load_config(DPOStageConfig, ROOT / "configs/tiny/dpo.yaml", ["model_init.mixed_precision=null"])
    process_state()  # as the stage does first: the Trainer uses the configured state
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, cfg.model_init)
    rows = encode_dpo_pairs(tokenizer, PAIRS)
    trainer = PairDPOTrainer(
        model=build_policy(source, cfg.model_init, tokenizer, seed=0),
        ref_model=build_policy(source, cfg.model_init, tokenizer, seed=0).requires_grad_(False).eval(),
        args=dpo_args(cfg, tmp_path, resolve_precision(cfg.model_init), cfg.data.max_length),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert calls == ["train"], changed(DPOTrainer, "_prepare_dataset", ours, "is no longer called on the train set")
    assert trainer.train_dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]


def test_fused_lm_head_compacts_on_cpu_with_the_same_loss(monkeypatch):
    """`compact_fused_lm_head` (rlhf/hf_trainer.py, around every TRL trainer's train()): on a CPU the
    fused head projects only the labelled positions, and the loss and gradients are those of every
    position projected. TRL decides compaction with `trl.trainer.utils._use_triton`."""
    ours = "compact_fused_lm_head (rlhf/hf_trainer.py)"
    assert "compact = _use_triton(" in inspect.getsource(trl_utils.add_fused_lm_head), (
        f"trl {trl.__version__}: add_fused_lm_head no longer decides compaction with _use_triton; {ours} relies on "
        f"it. Adapt it to the new TRL, then move the trl pin in pyproject.toml"
    )
    source = resolve("tiny-llama")
    model = build_policy(source, ModelInit(), load_tokenizer(source, ModelInit()), None, seed=0, precision=None)
    trl_utils.add_fused_lm_head(model)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :9] = -100  # the prompt: the last 3 tokens of each row are scored (11 positions after the shift)
    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(len(h)) or apply(h, *a))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads()
    with compact_fused_lm_head():
        compact_loss, compact_grads = loss_and_grads()
    assert rows == [2 * 11, 2 * 3], f"rows projected (every position, then the labelled ones): {rows}"
    torch.testing.assert_close(compact_loss, full_loss)
    for compact, full in zip(compact_grads, full_grads, strict=True):
        torch.testing.assert_close(compact, full)
    assert trl_utils._use_triton(torch.device("cpu")) is False, "the context must restore TRL's own choice"
