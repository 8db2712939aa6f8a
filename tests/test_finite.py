"""One non-finite check (rlhf/finite.py) for PPO's loop and the Trainer stages' FiniteGuard: a NaN or
an inf in any parameter or gradient is caught, by either."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.finite import finite_flag
from rlhf.hf_trainer import FiniteGuard


def test_finite_flag_catches_nan_or_inf_in_any_tensor():
    tensors = [torch.randn(4, 4) for _ in range(50)] + [torch.empty(0)]  # an empty ZeRO-3 shard
    assert finite_flag(tensors).item() == 0.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = [t.clone() for t in tensors]
        broken[37][2, 1] = bad
        assert math.isnan(finite_flag(iter(broken)).item())  # any iterable, e.g. a generator of grads
    assert finite_flag([]).item() == 0.0


def _model_with_grads() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model(torch.randn(2, 3)).sum().backward()
    return model


class _Accelerator:
    device = torch.device("cpu")

    def reduce(self, t, op):  # one process: the sum over processes is this one's flag
        return t


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["weight", "gradient"])
def test_both_checks_catch_nan_and_inf_in_a_parameter_and_a_gradient(where, bad):
    model = _model_with_grads()
    grads = lambda: [p.grad for p in model.parameters()]  # noqa: E731
    assert finite_flag(model.parameters()).item() == 0.0 and finite_flag(grads()).item() == 0.0
    target = model[1].weight if where == "weight" else model[1].weight.grad
    with torch.no_grad():
        target[0, 2] = bad
    tensors = model.parameters() if where == "weight" else grads()
    assert not torch.isfinite(finite_flag(tensors))  # PPO's loop: stages/ppo/train.py _stop_if_not_finite
    trainer = SimpleNamespace(model=model, accelerator=_Accelerator(), is_deepspeed_enabled=False)
    guard, state = FiniteGuard("sft", trainer), SimpleNamespace(global_step=4, max_steps=4)
    with pytest.raises(FloatingPointError, match="non-finite"):  # the Trainer stages' callback
        if where == "weight":
            guard.on_step_end(None, state, SimpleNamespace(should_save=True))
        else:
            guard.on_pre_optimizer_step(None, state, None)
