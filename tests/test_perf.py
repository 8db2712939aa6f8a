"""rlhf/perf.py: the FLOP model, the device peak, the clock and peak memory, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf import perf

# N = 10 trunk parameters, an LM head of 3, 2 layers, attention width 4; sequences of 3 and 5 real
# tokens: Σ T = 8, Σ T² = 9 + 25 = 34; the head at 0 positions unless said
M = perf.FlopModel(params=10, head=3, layers=2, attn_dim=4)
LENGTHS = [3, 5]


def test_forward_flops_by_hand():
    # matmuls 2·10·8 = 160; attention 2·2·4·34 = 544
    assert perf.forward_flops(M, LENGTHS, 0) == 160 + 544
    # the head at 4 positions (the responses' tokens): 2·3·4 = 24 more
    assert perf.forward_flops(M, LENGTHS, 4) == 704 + 24


def test_train_flops_by_hand():
    # full: matmuls 3 · 160 = 480 (6·N·ΣT), attention 3 · 544 = 1632
    assert perf.train_flops(M, LENGTHS, 0, full=True, checkpointing=False) == 2112
    # gradient checkpointing: one more forward, 704
    assert perf.train_flops(M, LENGTHS, 0, full=True, checkpointing=True) == 2816
    # LoRA: no weight gradients of the base, 160 fewer (4·N·ΣT)
    assert perf.train_flops(M, LENGTHS, 0, full=False, checkpointing=False) == 1952
    # the head at 4 positions: 24 a pass, three passes
    assert perf.train_flops(M, LENGTHS, 4, full=True, checkpointing=False) == 2112 + 3 * 24


def test_trunk_params_of_a_config():
    # h = 4, 1 layer, 2 heads of 2, 1 KV head, MLP 8:
    # attention 2·4·4 + 2·4·2 = 48; MLP 3·4·8 = 96; norms 8; final norm 4 -> 156
    config = SimpleNamespace(
        hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8
    )
    assert perf.trunk_params(config) == 156


@pytest.mark.parametrize("tied", [True, False])
def test_flop_model_of_a_model(tied):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    # the trunk as above (156), the LM head 4 · 10 = 40 whether tied or not, the embedding left out
    expected = perf.FlopModel(params=156, head=40, layers=1, attn_dim=4)
    assert perf.flop_model(LlamaForCausalLM(config)) == expected
    # a scalar head: 4 more trunk parameters, no LM head
    scalar = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
    assert perf.flop_model(scalar) == perf.FlopModel(params=160, head=0, layers=1, attn_dim=4)
    # another architecture (no intermediate_size, no KV heads in its config): read off its parameters
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=4, n_layer=1, n_head=2, vocab_size=10, n_positions=8))
    wte = 10 * 4
    assert perf.flop_model(gpt2).params == sum(p.numel() for p in gpt2.parameters()) - wte


def test_gpu_peaks_from_the_table():
    assert perf.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert perf.gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert perf.gpu_peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert perf.gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(66.9e12)
    assert perf.gpu_peak_flops("Some GPU", "bf16") is None


def test_cpu_peak_is_measured_once_and_positive():
    cpu = torch.device("cpu")
    first = perf.device_peak_flops(cpu, "fp32")
    assert first > 0 and perf.device_peak_flops(cpu, "fp32") == first  # cached: the same number
    # the global RNG untouched: measured mid-run, it would shift sampling (and break exact resume)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    perf.matmul_peak(torch.get_num_threads(), size=8, budget_s=0.1)
    assert torch.equal(torch.rand(3), before)


def test_mfu_and_memory():
    assert perf.mfu(100.0, 2.0, 100.0) == 0.5
    assert perf.clock(torch.device("cpu")) > 0
    memory = perf.memory_metrics(torch.device("cpu"))
    assert list(memory) == ["perf/max_rss_gb"] and memory["perf/max_rss_gb"] > 0  # RSS, labelled as such on a CPU


def test_ppo_step_flops_count_each_models_passes():
    """stages/ppo/throughput.py on M (forward 704 over LENGTHS with no head; the head at the 4
    response positions adds 24) and a scalar model S of 5 parameters, 1 layer, width 2:
    forward 2·5·8 + 2·1·2·34 = 80 + 136 = 216."""
    from stages.ppo.throughput import StepCost, rollout_flops, update_flops

    S = perf.FlopModel(params=5, head=0, layers=1, attn_dim=2)
    ppo = StepCost(
        policy=M, critic=S, shared_critic=False, reward=S, full=True, checkpointing=False, reuse_logprobs=False
    )
    # sampling, reference, policy forward: 3 · 728; value and reward model: 2 · 216
    assert rollout_flops(ppo, LENGTHS, 4) == 3 * 728 + 2 * 216
    # 2 epochs of the policy's (2112 + 3·24) and the critic's (3 · 216) forward-backward
    assert update_flops(ppo, LENGTHS, 4, epochs=2) == 2 * (2184 + 648)
    grpo = StepCost(
        policy=M, critic=None, shared_critic=False, reward=S, full=True, checkpointing=True, reuse_logprobs=True
    )
    assert rollout_flops(grpo, LENGTHS, 4) == 2 * 728 + 216  # log-probs from the sampling pass
    assert update_flops(grpo, LENGTHS, 4, epochs=1) == 2184 + 728  # and one recomputed forward
    shared = StepCost(
        policy=M, critic=None, shared_critic=True, reward=None, full=False, checkpointing=False, reuse_logprobs=True
    )
    assert rollout_flops(shared, LENGTHS, 4) == 2 * 728 + 704  # the trunk still runs for the values
    assert update_flops(shared, LENGTHS, 4, epochs=1) == 2184 - 184  # LoRA: no weight gradients of the base


def test_ppo_perf_metrics_from_a_rollout():
    from stages.ppo.throughput import StepCost, perf_metrics

    class OneProcess:
        num_processes, device = 1, torch.device("cpu")

        def reduce(self, t, op):
            return t

    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])  # 3 and 5 real tokens
    response_mask = torch.tensor([[1, 0], [1, 1]])  # 3 response tokens
    rollout = SimpleNamespace(attention_mask=mask, response_mask=response_mask)
    cost = StepCost(
        policy=M, critic=None, shared_critic=False, reward=None, full=True, checkpointing=False, reuse_logprobs=False
    )
    timings = {"generate": 1.5, "score": 0.5, "train": 2.0, "sync": 0.0}
    out = perf_metrics(cost, rollout, 1, timings, peak_flops=1000.0, accelerator=OneProcess())
    assert out["perf/rollout_tokens_per_s"] == 3 / 1.5
    assert out["perf/train_tokens_per_s"] == 8 / 2.0
    # head at 3 positions: forward 704 + 18 = 722, train 2112 + 54 = 2166; rollout 3 · 722
    assert out["perf/mfu_train"] == pytest.approx(2166 / 2.0 / 1000)
    assert out["perf/mfu"] == pytest.approx((3 * 722 + 2166) / 4.0 / 1000)
    assert out["perf/max_rss_gb"] > 0


def test_flop_model_of_the_qwen_shape_the_device_check_runs():
    # Qwen2.5-0.5B: 494,032,768 parameters, of which the tied 151,936 × 896 = 136,134,656 embedding;
    # 24 layers of 14 heads × 64
    from transformers import AutoModelForCausalLM

    from rlhf.registry.presets import PRESETS

    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(PRESETS["qwen2.5-0.5b-shape"].make_config())
    m = perf.flop_model(model)
    assert m == perf.FlopModel(params=494_032_768 - 136_134_656, head=136_134_656, layers=24, attn_dim=896)


def test_timer_feeds_each_phase_its_seconds_through_the_synced_clock(monkeypatch):
    """`timer` (veRL's marked_timer) reads `clock` (which waits for the GPU's queued work) at both
    ends of a phase and adds the difference to timings[name]: a phase entered twice sums, and a
    phase that raises is still charged."""
    ticks = iter([1.0, 3.5, 10.0, 10.25, 20.0, 24.0])
    seen = []
    monkeypatch.setattr(perf, "clock", lambda device: seen.append(device) or next(ticks))
    timings: dict[str, float] = {}
    with perf.timer("generate", timings, torch.device("cpu")):
        pass
    with perf.timer("generate", timings, torch.device("cpu")):
        pass
    with pytest.raises(RuntimeError), perf.timer("train", timings, torch.device("cpu")):
        raise RuntimeError("a phase that fails")
    assert timings == {"generate": 2.75, "train": 4.0} and seen == [torch.device("cpu")] * 6
