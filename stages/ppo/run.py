"""A PPO run's state as two objects (torchtune's recipe attributes, OpenRLHF's `Experience`), in
place of 9-12 positional arguments and an untyped dict:

- `PPORun`: what `train()` builds once — the config, the accelerator, the models, the rollout
  engine, the prompts, β's controller, the running score moments, tracking, the output directory
  and what a step costs — and every phase of the loop reads (sampling, scoring, saving);
- `LoopState`: what changes from step to step, checkpointed with the step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from accelerate import Accelerator

from rlhf.config import PPOStageConfig
from rlhf.tracking import Tracking
from stages.ppo.core_algos import KLController, RunningMoments
from stages.ppo.engines import RolloutEngine
from stages.ppo.models import Models
from stages.ppo.prompts import Prompts
from stages.ppo.throughput import StepCost


@dataclass(kw_only=True)
class PPORun:
    """Built once by `train()` (stages/ppo/train.py `setup`), by keyword. The last ones are unset only
    where a test rolls out or scores without a run directory."""

    cfg: PPOStageConfig
    accelerator: Accelerator
    models: Models  # policy + value (one module), reference, reward sources, optimizer, tokenizer
    engine: RolloutEngine  # samples the responses (hf or vllm)
    data: Prompts  # training prompts and the held-out splits
    kl_ctl: KLController  # β, fixed or adapted toward ppo.kl_target; checkpointed
    running: RunningMoments  # the scores' running mean and std (reward.normalize: running); checkpointed
    out: Path | None = None  # the output directory, taken (start_stage) once everything loaded
    tracking: Tracking | None = None
    cost: StepCost | None = None  # the FLOPs each step's passes cost (perf/mfu)
    peak_flops: float | None = None  # the device's peak, for perf/mfu
    ref_fingerprint: str | None = None  # the frozen reference's checksum, checked again at the end (None: ZeRO-3)
    started: float = 0.0  # time.time() when train() began (the manifest's duration)


@dataclass
class LoopState:
    """The loop's own state, written into every checkpoint's ppo_state.json under "state" (its keys
    those the dict it replaces had, so a checkpoint of either resumes under the other)."""

    step: int = 0  # optimizer phases done; the next step's index
    before: dict | None = None  # the held-out evaluation of the starting policy (eval.json's "before")
    kl_history: list[float] = field(default_factory=list)  # the last 10 steps' mean KL per sequence (final_kl)
    best: dict | None = None  # train.keep_best: {"by", "step", "value"} of the policy in out/best; None: none yet
    reward_fingerprint: str | None = None  # a remote reward model's, checked again on resume

    def to_dict(self) -> dict:
        """As checkpointed: `best` and `reward_fingerprint` only once set, as the dict had them."""
        state = asdict(self)
        return {k: v for k, v in state.items() if v is not None or k not in ("best", "reward_fingerprint")}

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        # a key this version does not know (a newer checkpoint's) is left out rather than refused
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})
