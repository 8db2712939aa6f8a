"""Step 3's reward sources: one registry of scorers keyed by kind, one signature.

A source scores this process's episodes: `source(episodes) -> (B,)` tensor, one score per episode.
A kind is a builder registered by `@reward_source("kind")`, called once at the stage's start with the
source's name, its config (the dataclass rlhf/config/rewards.py registered for the kind) and what
the stage builds (`SourceContext`); it returns the source. Outside code adds a kind by
registering its config dataclass there and its builder here. The built-in kinds:

- `model`: the learned reward model on the rollout's own tokens (`reward_model`);
- `rule`: a task rule (rlhf.tasks.RULES) as an ordinary reward function of the chat prompts;
- `function`: your own `fn(prompts, responses, **fields)`, imported here, at the stage's start;
- `remote`: a reward model served over HTTP (launch/serve_rm.py), asked by every process;
- `implicit`: a DPO model's implicit reward, beta · (log π_DPO − log π_ref) of the sampled tokens.

No `judge` kind yet: the judge in stages/reward/labellers.py compares two responses (A or B), it
gives no score of one response; a pointwise judge would be a new kind here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.config import ConfigError
from rlhf.config.rewards import (
    FunctionSourceConfig,
    ImplicitSourceConfig,
    ModelSourceConfig,
    RemoteSourceConfig,
    RewardSourceConfig,
    RuleSourceConfig,
)
from rlhf.config.stages import PPORewardConfig
from rlhf.registry import policy_logits, sequence_scores
from rlhf.reward_client import RemoteRewardError, RewardClient, ServedModelChanged
from rlhf.reward_functions import RewardFunctionError, checked_scores, load_reward_function
from rlhf.tasks import rule_reward
from stages.ppo.core_algos import logprobs_from_logits
from stages.ppo.rollout import in_micro_batches


@dataclass(kw_only=True)
class Episodes:
    """This process's B episodes, as every reward source reads them."""

    prompts: list[list[dict]]  # the chat prompts, one conversation of {"role", "content"} each
    responses: list[str]  # the decoded responses, each without its stop token
    fields: dict[str, list]  # the prompt rows' other fields (answer, tests, …), one list of B each
    input_ids: torch.Tensor  # (B, P+R) prompt + response tokens, as the policy sampled them
    attention_mask: torch.Tensor  # (B, P+R)
    response_ids: torch.Tensor | None = None  # (B, R) the response tokens (the last R of input_ids)
    response_mask: torch.Tensor | None = None  # (B, R) 1 up to and including the stop token
    # (B, R) fp32 log-probs of the response tokens under PPO's frozen reference at temperature 1, where
    # step 2 has them (None: before step 2, as dynamic sampling scores, or at another temperature)
    ref_logprobs: torch.Tensor | None = None


Source = Callable[[Episodes], torch.Tensor]  # -> (B,) one score per episode, on the accelerator's device


@dataclass(kw_only=True)
class SourceContext:
    """What a source may use. The sources are built before any model loads (a function source that
    cannot be imported stops the stage at once), so the models are filled in once built
    (stages/ppo/models.py `build_models`) and a source reads them when it scores, not when built."""

    accelerator: object  # accelerate.Accelerator
    reward_model: torch.nn.Module | None = None  # the frozen reward model (`reward_model`), placed
    reward_client: RewardClient | None = None  # the reward server's client (a `remote` source), connected
    forward_batch_size: int | None = None  # rollout.forward_batch_size: a model source's forward, rows at a time
    implicit_model: torch.nn.Module | None = None  # the frozen DPO model an `implicit` source reads, placed
    # (input_ids, attention_mask, response) -> (b, R) fp32 log-probs under PPO's frozen reference at temperature 1
    reference_logprobs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


SOURCES: dict[str, Callable[[str, RewardSourceConfig, SourceContext], Source]] = {}


def reward_source(kind: str):
    """Register `build(name, cfg, ctx) -> Source` as the scorer of reward sources of kind `kind`."""

    def register(build):
        if kind in SOURCES:
            raise ValueError(f"reward source kind {kind!r} already has a scorer ({SOURCES[kind].__name__})")
        SOURCES[kind] = build
        return build

    return register


def build_sources(cfg: PPORewardConfig, ctx: SourceContext) -> dict[str, Source]:
    """The configured sources, built in their configured order (the order their scores are added)."""
    sources = {}
    for name, source in cfg.active().items():
        if source.kind not in SOURCES:
            raise ConfigError(f"reward.sources.{name}.kind", f"no scorer registered for kind {source.kind!r}")
        sources[name] = SOURCES[source.kind](name, source, ctx)
    return sources


@reward_source("model")
def model_source(name: str, cfg: ModelSourceConfig, ctx: SourceContext) -> Source:
    """The reward model's score of the sampled tokens themselves (no decode and re-encode), in the
    stage's autocast, `forward_batch_size` episodes at a time. Its dtype is the model's; the weighted
    sum reads it in fp32."""

    def score(episodes: Episodes) -> torch.Tensor:
        with torch.no_grad(), ctx.accelerator.autocast():
            return in_micro_batches(
                lambda ids, mask: sequence_scores(ctx.reward_model, ids, mask),
                ctx.forward_batch_size,
                episodes.input_ids,
                episodes.attention_mask,
            )

    return score


@reward_source("implicit")
def implicit_source(name: str, cfg: ImplicitSourceConfig, ctx: SourceContext) -> Source:
    """beta · Σ_t (log π_DPO − log π_ref) over each response's tokens (up to and including its stop
    token), on the sampled tokens themselves; the reference's log-probs are step 2's where it has
    them, else one reference forward here. In the stage's autocast, `forward_batch_size` rows at a time."""

    def dpo_logprobs(ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        return logprobs_from_logits(policy_logits(ctx.implicit_model, ids, mask, response.shape[1]), response)

    def score(ep: Episodes) -> torch.Tensor:
        rows = (ep.input_ids, ep.attention_mask, ep.response_ids)
        with torch.no_grad(), ctx.accelerator.autocast():
            logprobs = in_micro_batches(dpo_logprobs, ctx.forward_batch_size, *rows)
            ref = ep.ref_logprobs
            if ref is None:
                ref = in_micro_batches(ctx.reference_logprobs, ctx.forward_batch_size, *rows)
        return implicit_rewards(logprobs, ref, ep.response_mask, cfg.beta)

    return score


def implicit_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """DPO's implicit reward of each response: beta · Σ_t mask_t · (logprobs_t − ref_logprobs_t).
    (B, R) each -> (B,) fp32."""
    return beta * ((logprobs.float() - ref_logprobs.float()) * response_mask).sum(1)


@reward_source("rule")
def rule_source(name: str, cfg: RuleSourceConfig, ctx: SourceContext) -> Source:
    return _function_scores(rule_reward(cfg.rule or name), cfg.rule or name, ctx)


@reward_source("function")
def function_source(name: str, cfg: FunctionSourceConfig, ctx: SourceContext) -> Source:
    try:  # the user's module is imported here, at the stage's start, not when the config loads
        fn = load_reward_function(cfg.function)
    except RewardFunctionError as e:
        raise ConfigError(f"reward.sources.{name}.function", str(e)) from None
    return _function_scores(fn, cfg.function, ctx)


def _function_scores(fn: Callable, spec: str, ctx: SourceContext) -> Source:
    device = ctx.accelerator.device
    return lambda ep: torch.tensor(
        checked_scores(fn, spec, ep.prompts, ep.responses, ep.fields), device=device, dtype=torch.float32
    )


@reward_source("remote")
def remote_source(name: str, cfg: RemoteSourceConfig, ctx: SourceContext) -> Source:
    return lambda ep: remote_model_scores(ctx.reward_client, ep.prompts, ep.responses, ctx.accelerator)


def connect_reward_server(cfg: RemoteSourceConfig, accelerator) -> RewardClient:
    """A client of the reward server for this process, which has read the served model's
    fingerprint; every process stops if any cannot reach it."""
    client = RewardClient(cfg)
    on_every_process(client.connect, cfg.url, accelerator)
    return client


def remote_model_scores(
    client: RewardClient, prompts: Sequence[list[dict]], responses: Sequence[str], accelerator
) -> torch.Tensor:
    """The served reward model's scores of this process's episodes (B,). Every process asks the
    server for its own."""
    scores = on_every_process(lambda: client.scores(prompts, responses), client.cfg.url, accelerator)
    return torch.tensor(scores, device=accelerator.device, dtype=torch.float32)


def on_every_process(call: Callable, url: str, accelerator):
    """call() on this process; if it failed on any process, all stop (RemoteRewardError, exit code
    3, or ServedModelChanged, exit code 2), so that no process waits forever at the next collective."""
    error, result = None, None
    try:
        result = call()
    except (RemoteRewardError, ServedModelChanged) as e:
        error = e
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RemoteRewardError(f"reward server {url} failed on another process; see its log")
    return result
