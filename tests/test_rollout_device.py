"""The rollout's side of a GPU run that the CPU cannot show by itself: an engine's samples reach the
forwards on the models' device, whatever device the engine answered on (vLLM answers on the CPU),
and the rollout's forwards in micro-batches give what one forward of the whole batch gives."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from rlhf.config import PPOStageConfig, load_config
from stages.ppo import train as ppo_train
from stages.ppo.rollout import Generated
from stages.ppo.run import PPORun


class _Reached(Exception):
    pass


class RecordingModel(torch.nn.Module):
    """Stands for the policy-and-value module on `device`: records the device of what its forward is
    given, then stops the rollout (nothing after the first forward is under test)."""

    def __init__(self, device: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[torch.device] = []

    def forward(self, input_ids, attention_mask, response_len, with_logits=True):
        self.seen += [input_ids.device, attention_mask.device]
        raise _Reached


class CPUEngine:
    """A rollout engine (the interface of stages/ppo/engines.py) that answers on the CPU, as vLLM does."""

    own_weights = True

    def generate(self, prompt_ids, gen, with_logprobs) -> Generated:
        B = len(prompt_ids)
        return Generated(
            prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9]])[:B],  # left-padded with 0
            response_ids=torch.tensor([[3, 4, 0], [3, 4, 2]])[:B],
            logprobs=torch.full((B, 3), -1.0),
            lengths=torch.tensor([2, 3])[:B],
            ended=torch.tensor([True, False])[:B],
        )

    def update_weights(self, model):
        pass

    def sleep(self):
        pass

    def close(self):
        pass


def test_an_engines_samples_reach_the_forwards_on_the_models_device():
    """The models and the accelerator are on `meta`, the engine answers on the CPU: the policy's
    forward must be handed `meta` tensors. Before the move at the engine boundary it was handed the
    engine's CPU tensors, which on a GPU fail in the embedding (issue 28, item 1)."""
    cfg = load_config(
        PPOStageConfig,
        ROOT / "configs/tiny/ppo.yaml",
        ["policy=tiny-llama", "reward_model=tiny-llama", "rollout.prompts_per_step=2", "ppo.minibatches=1"],
    )
    model = RecordingModel("meta")
    accelerator = SimpleNamespace(
        device=torch.device("meta"),
        num_processes=1,
        process_index=0,
        mixed_precision="no",
        autocast=contextlib.nullcontext,
        unwrap_model=lambda m: m,
    )
    models = SimpleNamespace(
        model=model,
        tokenizer=SimpleNamespace(pad_token_id=0),
        precision=SimpleNamespace(dtype=torch.float32),
        ref_policy=None,
        reward_model=None,
    )
    data = SimpleNamespace(prompt_ids=[[5, 6], [7, 8, 9]], prompts=[{}, {}])
    run = PPORun(
        cfg=cfg, accelerator=accelerator, models=models, engine=CPUEngine(), data=data, kl_ctl=None, running=None
    )
    with pytest.raises(_Reached):
        ppo_train.make_rollout(run, [0, 1], 0)
    assert model.seen and all(d == model.weight.device for d in model.seen), model.seen


class ReplayEngine(CPUEngine):
    """Answers with the same `Generated` every time (as built by the test)."""

    own_weights = False

    def __init__(self, sampled: Generated):
        self.sampled = sampled

    def generate(self, prompt_ids, gen, with_logprobs) -> Generated:
        assert len(prompt_ids) == self.sampled.response_ids.shape[0]
        return self.sampled


def test_rollout_forwards_in_micro_batches_equal_one_forward_of_the_whole_batch():
    """rollout.forward_batch_size splits the policy, reference, value and reward forwards into
    micro-batches of rows; with 7 episodes of unequal prompt and response lengths, micro-batches of
    1 and of 3 (3 + 3 + 1) give the log-probs, values, scores and rewards of one forward (null), to
    fp32 rounding."""
    import dataclasses

    from accelerate import Accelerator

    from rlhf.generation import left_pad
    from rlhf.precision import resolve_precision
    from rlhf.registry import score_head
    from stages.ppo.advantages import ESTIMATORS
    from stages.ppo.core_algos import KLController, RunningMoments
    from stages.ppo.models import build_models
    from stages.ppo.prompts import load_prompts
    from stages.ppo.rewards import SourceContext, build_sources

    overrides = ["policy=tiny-llama", "reward_model=tiny-llama", "rollout.prompts_per_step=7", "ppo.minibatches=1"]
    overrides += ["model_init.dtype=float32", "model_init.mixed_precision=null", "task.train_size=32"]
    overrides += ["rollout.logprobs_from_generation=false", "rollout.generation.max_new_tokens=6"]
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)
    assert cfg.rollout.forward_batch_size is None  # the default: the whole batch in one forward, as before
    precision = resolve_precision(cfg.model_init)
    accelerator = Accelerator(mixed_precision=precision.mixed, cpu=True)
    models = build_models(cfg, accelerator, ESTIMATORS["gae"], precision)
    data = load_prompts(cfg, models.tokenizer)
    batch = list(range(7))
    assert len({len(data.prompt_ids[i]) for i in batch}) > 1  # prompts of unequal length
    pad, eos = models.tokenizer.pad_token_id, models.tokenizer.eos_token_id
    prompts, _ = left_pad([data.prompt_ids[i] for i in batch], pad)
    lengths = torch.tensor([6, 2, 4, 1, 6, 3, 5])  # responses of unequal length, two cut off at 6
    response = torch.randint(3, 50, (7, 6), generator=torch.Generator().manual_seed(0))
    response[torch.arange(6)[None, :] >= lengths[:, None]] = pad
    ended = lengths < 6
    response[ended, lengths[ended] - 1] = eos
    engine = ReplayEngine(
        Generated(prompt_ids=prompts, response_ids=response, logprobs=None, lengths=lengths, ended=ended)
    )
    rows_seen: list[int] = []  # the rows of each forward of the reward model
    score_head(models.reward_model).register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))

    def rollout_with(size: int | None):
        sized = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, forward_batch_size=size))
        # the reward sources read forward_batch_size when built (stages/ppo/models.py): built again per size
        ctx = SourceContext(accelerator=accelerator, reward_model=models.reward_model, forward_batch_size=size)
        models.reward_sources = build_sources(sized.reward, ctx)
        rows_seen.clear()
        run = PPORun(
            cfg=sized,
            accelerator=accelerator,
            models=models,
            engine=engine,
            data=data,
            kl_ctl=KLController(cfg.ppo.kl_coef),
            running=RunningMoments(),
        )
        rollout, scored, *_ = ppo_train.make_rollout(run, batch, 0)
        return rollout, scored, list(rows_seen)

    whole, whole_scored, rows = rollout_with(None)
    assert whole.values is not None and whole_scored.components["rm"] is not None and rows == [7]
    assert whole.logprobs.abs().sum() > 0 and whole.response_mask.sum().item() == 27
    for size, expected_rows in ((1, [1] * 7), (3, [3, 3, 1])):
        split, split_scored, rows = rollout_with(size)
        assert rows == expected_rows
        for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages"):
            diff = (getattr(split, name) - getattr(whole, name)).abs().max().item()
            assert diff <= 1e-6, f"forward_batch_size={size}: {name} moved by {diff:.2e}"
        diff = (split_scored.components["rm"] - whole_scored.components["rm"]).abs().max().item()
        assert diff <= 1e-6, f"forward_batch_size={size}: the reward model's scores moved by {diff:.2e}"


def test_forward_batch_size_must_be_positive():
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=r"forward_batch_size.*must be >= 1"):
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["rollout.forward_batch_size=0"])
