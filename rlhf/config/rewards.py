"""PPO's reward sources as configured (`reward.sources`), TRL's `reward_funcs` + `reward_weights`
in one mapping: a name -> its kind, its weight and the kind's own settings.

    reward:
      sources:
        rm: {kind: model, weight: 1.0}                    # the learned reward model (`reward_model`)
        subtraction: {kind: rule, weight: 1.0}            # a task rule (rlhf.tasks.RULES), by the source's name
        fmt: {kind: function, function: "my_pkg.rewards:fmt", weight: 0.1}   # your own reward function
        served: {kind: remote, url: "http://127.0.0.1:8000/score"}          # a reward model over HTTP
        dpo: {kind: implicit, beta: 0.1}                  # a DPO model's implicit reward (`reward_model`: DPO's output)

A kind is a dataclass registered here by `@reward_kind("name")` (what a config may say, checked at
load) and a scorer registered under the same name in stages/ppo/rewards.py (how it scores, built at
the stage's start); outside code adds a kind by registering both. Nothing here imports a user's
module: a function source's "package.module:function" is checked for its form here and imported at
the stage's start. Each source's score is logged as `train/reward/<name>` (docs/rewards.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from rlhf.config.schema import ConfigError
from rlhf.tasks import RULES

REWARD_KINDS: dict[str, type[RewardSourceConfig]] = {}


def reward_kind(name: str):
    """Register a `RewardSourceConfig` subclass as the settings of reward sources of kind `name`."""

    def register(cls: type[RewardSourceConfig]) -> type[RewardSourceConfig]:
        if name in REWARD_KINDS:
            raise ValueError(f"reward source kind {name!r} is already registered ({REWARD_KINDS[name].__name__})")
        REWARD_KINDS[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class RewardSourceConfig:
    """One reward source; `kind` picks the registered dataclass that holds its settings."""

    kind: str = ""  # model, rule, function, remote, implicit, or a kind registered by outside code
    weight: float = 1.0  # its score's weight in the sequence score; 0: scored and logged, not optimised

    @classmethod
    def variant(cls, data: dict) -> type[RewardSourceConfig]:
        """The dataclass of `data`'s kind (rlhf/config/schema.py asks before building it)."""
        kind = data.get("kind")
        if kind in REWARD_KINDS:
            return REWARD_KINDS[kind]
        close = difflib.get_close_matches(str(kind), REWARD_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError("kind", f"unknown reward source kind {kind!r}{hint} (known: {sorted(REWARD_KINDS)})")

    def check_named(self, name: str) -> None:
        """Checks that need the source's name (the rule kind reads its rule from it)."""


@reward_kind("model")
@dataclass(frozen=True)
class ModelSourceConfig(RewardSourceConfig):
    """The learned reward model (the stage's `reward_model`) scoring the rollout's own tokens."""


@reward_kind("rule")
@dataclass(frozen=True)
class RuleSourceConfig(RewardSourceConfig):
    """A built-in task rule (rlhf.tasks.RULES), called as a reward function of the last user message."""

    rule: str | None = None  # the rule's name; null: the source's name (`subtraction: {kind: rule}`)

    def check_named(self, name: str) -> None:
        if (self.rule or name) not in RULES:
            raise ConfigError("rule", f"unknown rule reward {self.rule or name!r}; known: {sorted(RULES)}")


@reward_kind("function")
@dataclass(frozen=True)
class FunctionSourceConfig(RewardSourceConfig):
    """Your own `fn(prompts, responses, **fields) -> list[float]` (rlhf/reward_functions.py)."""

    function: str = ""  # "package.module:function"; imported at the stage's start, not when the config loads

    def check(self) -> None:
        module, sep, attr = self.function.partition(":")
        if not (sep and module and attr):
            raise ConfigError("function", f"expected 'package.module:function', got {self.function!r}")


@reward_kind("remote")
@dataclass(frozen=True)
class RemoteSourceConfig(RewardSourceConfig):
    """A reward model served over HTTP by `launch/serve_rm.py` (API: docs/rewards.md). Each process
    sends its own episodes' decoded chat prompts and responses once per step."""

    url: str = ""  # the scoring endpoint, e.g. http://127.0.0.1:8000/score
    timeout: float = 60.0  # seconds per request
    # tries after the first failed one (connection refused, time-out, HTTP 5xx), with exponential
    # backoff (backoff, 2·backoff, 4·backoff s); then the run stops with exit code 3, its last
    # checkpoint intact for resume. HTTP 4xx (a bad request) is not retried.
    retries: int = 3
    backoff: float = 1.0

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("url", f"must be an http:// or https:// URL, got {self.url!r}")
        if not self.timeout > 0:
            raise ConfigError("timeout", f"must be > 0, got {self.timeout}")
        if self.retries < 0 or self.backoff < 0:
            raise ConfigError("retries", "retries and backoff must be >= 0")


@reward_kind("implicit")
@dataclass(frozen=True)
class ImplicitSourceConfig(RewardSourceConfig):
    """A DPO model's implicit reward (Rafailov et al. 2023, eq. 5): beta · Σ_t (log π_DPO(y_t | x, y_<t)
    − log π_ref(y_t | x, y_<t)) over the rollout's own response tokens, stop token included. π_DPO is
    the stage's `reward_model`, a DPO stage's output (a causal LM, no scalar head); π_ref is PPO's frozen
    reference, whose log-probs step 2 already holds, so it must be the model DPO started from. With
    PPO's KL weight equal to beta (`ppo.kl_coef: <beta>`, `ppo.kl_target: null`) the KL-regularised
    optimum is the DPO model itself; a smaller KL weight raises DPO's change to a power (docs/rewards.md)."""

    beta: float = 0.1  # DPO's loss.beta: the reward is in the units DPO learnt it in

    def check(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0 (DPO's loss.beta), got {self.beta}")


# The keys reward.sources replaced, each with how to write it now (one line, rlhf/config/schema.py MOVED_KEYS).
MOVED_REWARD_KEYS = {
    "model_weight": "replaced by reward.sources: write `reward.sources.rm={kind: model, weight: 1.0}` "
    "(docs/rewards.md)",
    "rules": "replaced by reward.sources: write `reward.sources.subtraction={kind: rule, weight: 1.0}` "
    "(docs/rewards.md)",
    "functions": 'replaced by reward.sources: write `reward.sources.mine={kind: function, function: "pkg.mod:fn", '
    "weight: 1.0}` (docs/rewards.md)",
    "remote": "replaced by reward.sources: write `reward.sources.served={kind: remote, url: "
    '"http://127.0.0.1:8000/score", weight: 1.0}` (docs/rewards.md)',
}
