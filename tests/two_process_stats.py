"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: each process holds
its part of one batch (different sizes and different numbers of real tokens) and whitens its
advantages and computes the explained variance as the PPO recipe does; the main process checks
that the result equals the same statistics of the whole batch and writes `ok` to argv[1]."""

import json
import sys

import torch
from accelerate import Accelerator

from stages.ppo.advantages import explained_variance, explained_variance_sums, whiten_advantages
from stages.ppo.core_algos import masked_whiten

accelerator = Accelerator(cpu=True)
g = torch.Generator().manual_seed(0)
advantages = torch.randn(10, 6, generator=g) * 3 + 1  # (B, R), the whole batch
values, returns = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
mask = (torch.rand(10, 6, generator=g) > 0.4).long()
mask[:4, 4:] = 0  # process 0 holds fewer real tokens
rows = slice(0, 4) if accelerator.process_index == 0 else slice(4, 10)

mine = whiten_advantages(advantages[rows], mask[rows], accelerator)
ev_sums = accelerator.reduce(explained_variance_sums(values[rows], returns[rows], mask[rows]), "sum")
ev = explained_variance(values[rows], returns[rows], mask[rows], ev_sums)
whitened = torch.cat(accelerator.gather_for_metrics([mine], use_gather_object=True))
if accelerator.is_main_process:
    whole = masked_whiten(advantages, mask)
    per_process = masked_whiten(advantages[:4], mask[:4])  # what each process computed before
    result = {
        "whitening_matches": torch.allclose(whitened, whole, atol=1e-5),
        "explained_variance_matches": abs(ev - explained_variance(values, returns, mask)) < 1e-6,
        "per_process_differs": not torch.allclose(per_process, whole[:4], atol=1e-3),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
accelerator.wait_for_everyone()
accelerator.end_training()
