"""DPO, the other road from SFT, through its real entry point on test-sized models: the policy
changes and reloads, eval.json holds the held-out accuracy before and after; the loss TRL computes
in our trainer is the DPO loss of the sequences the policy generates, against the reference; an
interrupted run resumes to the same weights; the SFT -> DPO pipeline chains the two stages."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ROOT, run_entry, tiny_config
from rlhf.config import ConfigError, DPOStageConfig, ModelInit, load_config
from rlhf.distributed import process_state
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.tracking import read_metrics
from stages.dpo.train import PairDPOTrainer, _reference_is_adapter_off, dpo_args, encode_dpo_pairs

FAST = [
    "task.eval_size=16",
    "task.test_per_bucket=8",
    "pairs.train_size=256",
    "pairs.eval_size=32",
    "pairs.onpolicy_fraction=0.25",
    "loss.sft_coef=0",  # plain DPO, whose first loss is log 2 (configs/tiny/dpo.yaml adds RPO's NLL term)
    "train.batch_size=8",
    "train.log_every=1",
    "optim.lr=1e-3",
    "optim.warmup_ratio=0",
    "model_init.mixed_precision=null",
    "generation.max_new_tokens=6",
    "tracking.report_to=[]",
    "tracking.progress=false",
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A policy directory to start from (a test-sized random model saved as an SFT output)."""
    out = tmp_path_factory.mktemp("policy")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    build_policy(source, ModelInit(), tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def dpo(out, *extra, policy, timeout=600):
    return run_entry("launch/stage3_dpo.py", f"policy={policy}", *FAST, *extra, f"output_dir={out}", timeout=timeout)


@pytest.mark.slow
def test_smoke_run_trains_saves_and_reports_before_and_after(sft_dir, tmp_path):
    out = tmp_path / "dpo"
    result = dpo(out, "train.max_steps=6", "train.save_every=3", policy=sft_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    losses = [r["train/dpo/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/dpo/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0: −log σ(0)
    assert any("train/dpo/rewards/margins" in r for r in read_metrics(out / "metrics.jsonl"))

    before, after = load_file(sft_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(out)  # a plain Hugging Face directory

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["finished"] and manifest["model"] == str(sft_dir)
    report = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert set(report[when]["accuracy_by_digits"]) == {"2", "5"} and report[when]["n"] == 16
    assert 0.0 <= report["pairs"]["accuracy"] <= 1.0 and math.isfinite(report["pairs"]["loss"])
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()


def response_logprob(model, tokenizer, question: str, answer: str) -> tuple[float, int]:
    """(log π(answer + EOS | prompt) summed over the answer's tokens, their count), of the sequence generation
    produces: the chat-rendered prompt, the answer's tokens, EOS. Built here independently of the
    stage's encoder."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts token t+1
    targets = ids[0, 1:]
    per_token = logprobs.gather(-1, targets[:, None])[:, 0]
    return per_token[len(prompt_ids) - 1 :].sum().item(), len(answer_ids)


def sigmoid_dpo(pi_c, pi_r, ref_c, ref_r, beta):
    # −log σ(β((π_c − ref_c) − (π_r − ref_r))). Worked by hand: π_c = −1, ref_c = −2, π_r = −3,
    # ref_r = −1, β = 0.1 -> β·(1 − (−2)) = 0.3 -> log(1 + e^−0.3) = log(1.7408) = 0.5544
    return math.log1p(math.exp(-beta * ((pi_c - ref_c) - (pi_r - ref_r))))


def ipo(pi_c, pi_r, ref_c, ref_r, beta, n_c, n_r):
    # IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL computes it:
    # ((π_c − ref_c)/n_c − (π_r − ref_r)/n_r − 1/(2β))². By hand, with the numbers above, n_c = 2,
    # n_r = 3, β = 0.5: (0.5 − (−2/3) − 1)² = (1/6)² = 0.02778
    return ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 * beta)) ** 2


def test_hand_worked_values():
    assert sigmoid_dpo(-1.0, -3.0, -2.0, -1.0, 0.1) == pytest.approx(0.5544, abs=1e-4)
    assert ipo(-1.0, -3.0, -2.0, -1.0, 0.5, 2, 3) == pytest.approx(0.02778, abs=1e-5)


@pytest.mark.parametrize(
    "loss", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("sigmoid", 0.1, 0.5)], ids=["sigmoid", "ipo", "sigmoid+sft"]
)
def test_trainer_loss_is_the_dpo_loss_of_the_generated_sequences(tmp_path, loss):
    """Our trainer's loss on a batch equals the formula on log-probs computed here by hand: the
    pairs are tokenised as the policy writes them (EOS included), the reference is the frozen
    second model (here another random init, so that it matters), chosen and rejected are not
    swapped, and `loss.sft_coef` adds the chosen answers' mean token NLL."""
    kind, beta, sft_coef = loss
    cfg = load_config(
        DPOStageConfig,
        ROOT / "configs/tiny/dpo.yaml",
        [
            "policy=tiny-llama",
            f"output_dir={tmp_path}",
            f"loss.type={kind}",
            f"loss.beta={beta}",
            f"loss.sft_coef={sft_coef}",
            "model_init.mixed_precision=null",
        ],
    )
    process_state()  # as the stage does first: the Trainer uses the configured state
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, cfg.model_init)
    policy = build_policy(source, cfg.model_init, tokenizer, seed=0)
    reference = build_policy(source, cfg.model_init, tokenizer, seed=1).requires_grad_(False).eval()
    plain_policy = build_policy(source, cfg.model_init, tokenizer, seed=0).eval()  # the same weights, untouched by TRL
    questions = ["请计算：52 - 17 = ，直接返回计算结果", "请计算：3 - 40 = ，直接返回计算结果"]
    answers = [("35", "45"), ("-37", "37")]
    pairs = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for q, (c, r) in zip(questions, answers, strict=True)
    ]
    rows = encode_dpo_pairs(tokenizer, pairs)
    trainer = PairDPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_args(cfg, tmp_path, resolve_precision(cfg.model_init), cfg.data.max_length),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()

    expected, nll = [], []
    for q, (c, r) in zip(questions, answers, strict=True):
        pi_c, n_c = response_logprob(plain_policy, tokenizer, q, c)
        pi_r, n_r = response_logprob(plain_policy, tokenizer, q, r)
        ref_c, _ = response_logprob(reference, tokenizer, q, c)
        ref_r, _ = response_logprob(reference, tokenizer, q, r)
        expected.append(sigmoid_dpo(pi_c, pi_r, ref_c, ref_r, beta) if kind == "sigmoid" else 0.0)
        if kind == "ipo":
            expected[-1] = ipo(pi_c, pi_r, ref_c, ref_r, beta, n_c, n_r)
        nll.append((-pi_c, n_c))
    want = sum(expected) / len(expected) + sft_coef * sum(x for x, _ in nll) / sum(n for _, n in nll)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(sft_dir, tmp_path):
    args = ["train.max_steps=12", "train.save_every=4", "pairs.onpolicy_fraction=0"]
    straight = dpo(tmp_path / "straight", *args, policy=sft_dir)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "launch/stage3_dpo.py"), *tiny_config("launch/stage3_dpo.py", ())]
    cmd += [f"policy={sft_dir}", *FAST, *args, f"output_dir={out}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.time() + 600
    while not (out / "checkpoints" / "checkpoint-4" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    resumed = dpo(out, *args, policy=sft_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_pipeline_dry_run_chains_sft_then_dpo(tmp_path):
    result = run_entry(
        "launch/pipeline.py", "--config", "configs/tiny/pipeline_dpo.yaml", f"runs_dir={tmp_path}", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[pipeline]")]
    assert [line.split(":")[0] for line in lines] == ["[pipeline] sft", "[pipeline] dpo"]
    args = shlex.split(lines[1].split(":", 1)[1])  # as a shell would pass them to the stage
    assert any(a.endswith("launch/stage3_dpo.py") for a in args)
    assert f'policy="{tmp_path / "tiny-dpo" / "sft"}"' in args  # a typed, quoted path


def test_pipeline_refuses_a_stage_before_its_input():
    from rlhf.pipeline import load_pipeline

    with pytest.raises(ConfigError, match=r"stages.*dpo reads the output of sft"):
        load_pipeline(str(ROOT / "configs/tiny/pipeline_dpo.yaml"), ["stages=[dpo]"])


@pytest.mark.parametrize(
    "override, words",
    [
        ("loss.label_smoothing=0.1", "not read by loss type 'sigmoid'"),
        ("loss.beta=0", "must be > 0"),
        ("loss.type=exo_pair", "must be > 0 with exo_pair"),
        ("loss.type=kto", "must be one of"),
    ],
)
def test_bad_loss_settings_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(DPOStageConfig, ROOT / "configs/tiny/dpo.yaml", [override])
    assert e.value.key.startswith("loss.")


def test_with_lora_the_reference_is_the_policy_with_its_adapter_off(tmp_path):
    """No second model with LoRA: TRL's copy of the new adapter is dropped, so the reference is
    the adapter-off policy (the SFT weights) and nothing but the trained adapter is saved."""
    cfg = load_config(
        DPOStageConfig,
        ROOT / "configs/tiny/dpo.yaml",
        [
            "policy=tiny-llama",
            f"output_dir={tmp_path}",
            "lora.enabled=true",
            "lora.r=4",
            "loss.sft_coef=0",  # the sigmoid loss alone, as computed by hand below
            "model_init.mixed_precision=null",
        ],
    )
    process_state()
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, cfg.model_init)
    policy = build_policy(source, cfg.model_init, tokenizer, cfg.lora, seed=0)
    pair = {
        "prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}],
        "chosen": [{"role": "assistant", "content": "35"}],
        "rejected": [{"role": "assistant", "content": "45"}],
    }
    rows = encode_dpo_pairs(tokenizer, [pair])
    trainer = PairDPOTrainer(
        model=policy,
        ref_model=None,
        args=dpo_args(cfg, tmp_path, resolve_precision(cfg.model_init), cfg.data.max_length),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    _reference_is_adapter_off(trainer)
    assert list(trainer.model.peft_config) == ["default"]
    # move the adapter off zero, so that policy and reference differ
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
        with trainer.model.disable_adapter():
            ref_c, _ = response_logprob(trainer.model, tokenizer, pair["prompt"][0]["content"], "35")
            ref_r, _ = response_logprob(trainer.model, tokenizer, pair["prompt"][0]["content"], "45")
        pi_c, _ = response_logprob(trainer.model, tokenizer, pair["prompt"][0]["content"], "35")
        pi_r, _ = response_logprob(trainer.model, tokenizer, pair["prompt"][0]["content"], "45")
    assert got == pytest.approx(sigmoid_dpo(pi_c, pi_r, ref_c, ref_r, cfg.loss.beta), rel=1e-4, abs=1e-5)


def test_full_fine_tuning_reference_computes_as_the_policy_at_step_0(tmp_path):
    """bf16 weights with full fine-tuning (as on a bf16 GPU) train fp32 weights under bf16 autocast; the
    frozen reference must be built the same way, or every embedding and norm differs and the first loss
    is not −log σ(0) = log 2."""
    from stages.dpo.train import _build_trainer

    cfg = load_config(
        DPOStageConfig,
        ROOT / "configs/tiny/dpo.yaml",
        ["policy=tiny-llama", f"output_dir={tmp_path}", "loss.sft_coef=0", "model_init.dtype=bfloat16"],
    )
    process_state()
    precision = resolve_precision(cfg.model_init)
    assert precision.mixed == "bf16" and precision.trained_dtype == torch.float32
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, cfg.model_init)
    pair = {
        "prompt": [{"role": "user", "content": "请计算：52 - 17 = ，直接返回计算结果"}],
        "chosen": [{"role": "assistant", "content": "35"}],
        "rejected": [{"role": "assistant", "content": "45"}],
    }
    rows = encode_dpo_pairs(tokenizer, [pair])
    trainer = _build_trainer(cfg, source, tokenizer, precision, tmp_path, rows, None)
    assert next(trainer.ref_model.parameters()).dtype == next(trainer.model.parameters()).dtype == torch.float32
    trainer.model.eval()
    with torch.no_grad(), trainer.accelerator.autocast():
        got = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
    assert got == math.log(2) or abs(got - math.log(2)) < 1e-7
