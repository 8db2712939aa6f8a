"""The rollout's side of a GPU run that the CPU cannot show by itself: an engine's samples reach the
forwards on the models' device, whatever device the engine answered on (vLLM answers on the CPU)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from rlhf.config import PPOStageConfig, load_config
from stages.ppo import train as ppo_train
from stages.ppo.rollout import Generated


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
    with pytest.raises(_Reached):
        ppo_train.make_rollout(models, CPUEngine(), data, [0, 1], cfg, None, None, accelerator, 0)
    assert model.seen and all(d == model.weight.device for d in model.seen), model.seen
