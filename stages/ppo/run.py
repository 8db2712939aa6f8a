"""What a PPO run carries from step to step: `LoopState`, checkpointed with the step (torchtune's
recipe attributes, in place of an untyped dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


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
