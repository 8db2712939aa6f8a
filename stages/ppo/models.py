"""PPO's four models (seed 002): the policy and the value model, which train; the frozen reference
and the frozen reward model.

The policy and the value model live in one module, `PolicyAndValue`, so that DDP or DeepSpeed
wraps and steps them together with one optimizer (two parameter groups: separate learning rates).
The value model is a second decoder with a scalar head, or (`share_policy_trunk`) a `ValueHead` read
off the policy's own last hidden state: one forward gives both, and there is no second model.
With LoRA the reference is the policy itself with its adapter switched off — the SFT weights,
since the SFT adapter (if any) was merged in before the PPO adapter was added — so there is no
second copy of the weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rlhf.checkpoint import path_identity, read_manifest
from rlhf.config import ConfigError, PPOStageConfig
from rlhf.distributed import deepspeed_plugin, is_zero3
from rlhf.precision import Precision
from rlhf.registry import (
    ModelSource,
    build_policy,
    build_scalar_model,
    load_tokenizer,
    policy_forward,
    policy_logits,
    resolve,
    stop_token_ids,
    token_scores,
)
from rlhf.reward_client import RewardClient
from stages.ppo.advantages import Estimator
from stages.ppo.core_algos import logprobs_from_logits
from stages.ppo.optim import build_optimizer, fill_deepspeed_config, param_groups
from stages.ppo.rewards import Source, SourceContext, build_sources, connect_reward_server

log = logging.getLogger("rlhf.ppo")
# the stages whose output is a language model (no scalar head): a DPO-style one an `implicit` source reads
LANGUAGE_MODEL_STAGES = ("sft", "ppo", "dpo", "kto", "orpo", "cpo", "simpo")


class PolicyAndValue(nn.Module):
    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, with_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids, attention_mask (B, P + R): left-padded prompt then response.
        Returns logits (B, R, V) at the positions that predict each response token (None without
        `with_logits`: only what the values need runs), and values (B, R), V(s_t) of the state before
        each response token (None without a value model: a critic-free advantage estimator)."""
        if self.value_model is None:
            logits = policy_logits(self.policy, input_ids, attention_mask, response_len) if with_logits else None
            return logits, None
        if isinstance(self.value_model, ValueHead):  # one forward of the shared trunk gives both
            keep = response_len + 1 if with_logits else 1
            out = policy_forward(self.policy, input_ids, attention_mask, keep, hidden_states=True)
            values = self.value_model(out.hidden_states[-1][:, -response_len - 1 : -1])
            return (out.logits[:, :-1] if with_logits else None), values
        logits = policy_logits(self.policy, input_ids, attention_mask, response_len) if with_logits else None
        values = token_scores(self.value_model, input_ids, attention_mask)[:, -response_len - 1 : -1]
        return logits, values


class ValueHead(nn.Module):
    """V(s_t) as a linear read-out of the policy's last (normalised) hidden state, as in PPO
    implementations that share the actor's trunk with the critic. It starts at zero, so the first
    advantages are the returns themselves; `ppo.value_warmup_steps` lets it fit before the policy
    moves. (B, T, H) -> (B, T), fp32."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the head holds the stage's trained dtype (fp32 without DeepSpeed) while `hidden` may be
        # bf16 (bf16 policy weights under LoRA or DeepSpeed); QLoRA's k-bit preparation leaves the
        # policy's final norm in fp32. A no-op where they agree.
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


@torch.no_grad()
def reference_logits(
    unwrapped: PolicyAndValue,
    ref_policy: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
) -> torch.Tensor:
    """Logits (B, R, V) of the frozen reference: a separate copy, or (LoRA) the policy with its
    adapter disabled."""
    if ref_policy is not None:
        return policy_logits(ref_policy, input_ids, attention_mask, response_len)
    with unwrapped.policy.disable_adapter():
        return policy_logits(unwrapped.policy, input_ids, attention_mask, response_len)


@torch.no_grad()
def reference_logprobs(
    unwrapped: PolicyAndValue,
    ref_policy: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, R) fp32 log-probs of the response tokens under the frozen reference, of softmax(logits / T)."""
    logits = reference_logits(unwrapped, ref_policy, input_ids, attention_mask, response.shape[1])
    return logprobs_from_logits(logits.float() / temperature, response)


@torch.no_grad()
def rollout_forwards(
    model: nn.Module,
    ref_policy: nn.Module | None,
    accelerator,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response: torch.Tensor,
    *,
    temperature: float,
    with_logprobs: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """PPO's step 2 on some rows of the rollout: (logprobs, ref_logprobs, values), each (b, R), the
    log-probs of softmax(logits / T) in fp32 whatever the models compute in; logprobs None without
    `with_logprobs` (taken from the sampling pass), values None without a critic. Each logits
    tensor (b, R, V) is freed before the next forward."""
    R = response.shape[1]
    with accelerator.autocast():
        logits, values = model(input_ids, attention_mask, R, with_logits=with_logprobs)
        logprobs = None if logits is None else logprobs_from_logits(logits.float() / temperature, response)
        del logits
        unwrapped = accelerator.unwrap_model(model)
        ref_logprobs = reference_logprobs(unwrapped, ref_policy, input_ids, attention_mask, response, temperature)
    return logprobs, ref_logprobs, values


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference and the reward model never change."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares two forwards of the same weights; dropout would make them differ.
    Besides `nn.Dropout` modules, Hugging Face attention applies dropout functionally with a
    probability read from the config into a plain attribute (Llama / Qwen2 / Mistral
    `self.attention_dropout`), so every dropout probability of every config (attention_dropout,
    hidden_dropout, GPT-2's attn_pdrop / resid_pdrop / embd_pdrop, ...) and of every module is set
    to 0 too. The saved config then says 0 as well, which is how the model was trained."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        _zero_dropout_numbers(module)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _zero_dropout_numbers(config)
            for name in getattr(config, "sub_configs", {}) or {}:
                if getattr(config, name, None) is not None:
                    _zero_dropout_numbers(getattr(config, name))


def _zero_dropout_numbers(obj) -> None:
    """Set every numeric attribute of `obj` named like a dropout probability (…dropout…, …pdrop)
    to 0."""
    for name, value in list(vars(obj).items()):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and value and ("dropout" in name or name.endswith("pdrop")):
            setattr(obj, name, 0.0)


def prepare_frozen(model: nn.Module, accelerator) -> nn.Module:
    """Place a frozen model. Under DeepSpeed ZeRO-3 it becomes an inference engine whose weights
    are sharded like the trained ones; otherwise it is simply moved to the device."""
    if not is_zero3(accelerator):
        return model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(deepspeed_plugin(accelerator).deepspeed_config)
    config["train_micro_batch_size_per_gpu"] = 1
    config.pop("train_batch_size", None)
    config.pop("gradient_accumulation_steps", None)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@dataclass(kw_only=True)
class Models:
    """PPO's four models (seed 002), placed by accelerate."""

    model: torch.nn.Module  # PolicyAndValue (policy + value model, or the policy alone), wrapped
    optimizer: torch.optim.Optimizer
    ref_policy: torch.nn.Module | None  # None with LoRA: the policy with its adapter switched off
    reward_model: torch.nn.Module | None  # the scalar-head reward model (a `model` source's)
    implicit_model: torch.nn.Module | None  # the DPO model an `implicit` source reads
    tokenizer: object
    stop_ids: tuple[int, ...]  # the tokens that end a response: EOS and the template's end of turn
    policy_source: ModelSource
    precision: Precision  # how the models compute (rlhf/precision.py)
    reward_client: RewardClient | None = None  # the reward model served over HTTP (a `remote` reward source)
    reward_sources: dict[str, Source] = field(default_factory=dict)  # reward.sources, built (stages/ppo/rewards.py)


def build_models(cfg: PPOStageConfig, accelerator, estimator: Estimator, precision: Precision) -> Models:
    """Policy + value model (trained; no value model when the estimator needs no critic),
    reference + reward model (frozen), the optimizer, placed by accelerate, and the reward sources."""
    # built first: a function source that cannot be imported stops the stage before any model loads
    ctx = SourceContext(accelerator=accelerator, forward_batch_size=cfg.rollout.forward_batch_size)
    reward_sources = build_sources(cfg.reward, ctx)
    policy_source = resolve(cfg.policy)
    tokenizer = load_tokenizer(policy_source, cfg.model_init)
    policy = build_policy(
        policy_source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True
    )
    ref_policy = None
    if not cfg.lora.enabled:
        # the same seed as the policy: a preset policy is a random init, and the reference must be that model
        ref_source = resolve(cfg.reference) if cfg.reference else policy_source
        if cfg.reference:
            _check_same_tokenizer(tokenizer, load_tokenizer(ref_source, cfg.model_init), cfg.reference, "reference")
        ref_policy = freeze(
            build_policy(ref_source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision, reference=True)
        )
    reward_model, implicit_model = build_reward_model(cfg, tokenizer, precision)
    value_model = None
    if estimator.needs_critic and cfg.share_policy_trunk:
        value_model = ValueHead(policy.config.hidden_size, precision.trained_dtype)
    elif estimator.needs_critic:
        value_source = resolve(cfg.value_model or cfg.reward_model or cfg.policy)
        value_model = build_scalar_model(
            value_source, cfg.model_init, tokenizer, cfg.lora, seed=cfg.seed, precision=precision, trained=True
        )
    for m in (policy, value_model, ref_policy, reward_model, implicit_model):
        if m is not None:
            disable_dropout(m)
    model = PolicyAndValue(policy, value_model)
    plugin = deepspeed_plugin(accelerator)
    ds_config = plugin.deepspeed_config if plugin is not None else None
    optimizer = build_optimizer(param_groups(policy, value_model, cfg), cfg.optim.lr, ds_config)
    fill_deepspeed_config(accelerator, cfg, policy.config.hidden_size, value_model is not None, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref_policy = prepare_frozen(ref_policy, accelerator) if ref_policy is not None else None
    reward_model = prepare_frozen(reward_model, accelerator) if reward_model is not None else None
    implicit_model = prepare_frozen(implicit_model, accelerator) if implicit_model is not None else None
    remote = next(iter(cfg.reward.of_kind("remote").values()), None)  # at most one (PPORewardConfig.check)
    reward_client = connect_reward_server(remote, accelerator) if remote is not None else None
    # what the sources score with
    ctx.reward_model, ctx.reward_client, ctx.implicit_model = reward_model, reward_client, implicit_model
    ctx.reference_logprobs = partial(reference_logprobs, accelerator.unwrap_model(model), ref_policy)
    return Models(
        model=model,
        optimizer=optimizer,
        ref_policy=ref_policy,
        reward_model=reward_model,
        implicit_model=implicit_model,
        tokenizer=tokenizer,
        # decided once, from the policy as built (its generation_config holds the same set, which the
        # rollout engine's generate() stops at): the masks, the missing-EOS penalty and the RM read
        stop_ids=stop_token_ids(tokenizer, policy.generation_config),
        policy_source=policy_source,
        precision=precision,
        reward_client=reward_client,
        reward_sources=reward_sources,
    )


def build_reward_model(
    cfg: PPOStageConfig, tokenizer, precision: Precision
) -> tuple[nn.Module | None, nn.Module | None]:
    """(the scalar-head reward model, the DPO model an `implicit` source reads), frozen: `reward_model`
    built as the one its sources read it as, or neither without one."""
    if not cfg.reward_model:
        return None, None
    _check_reward_model_kind(cfg)
    source = resolve(cfg.reward_model)
    _check_same_tokenizer(tokenizer, load_tokenizer(source, cfg.model_init), cfg.reward_model, "reward_model")
    if cfg.scalar_reward_model:
        return freeze(build_scalar_model(source, cfg.model_init, tokenizer, precision=precision)), None
    return None, freeze(build_policy(source, cfg.model_init, tokenizer, precision=precision))  # a causal LM


def _check_reward_model_kind(cfg: PPOStageConfig) -> None:
    """Refuse a reward model read as the wrong kind (a DPO model's random scalar head, or an RM's
    head-less trunk as a language model), by the stage its manifest names; warn where a DPO model's
    reference was not PPO's reference, which its implicit reward is measured against."""
    manifest = read_manifest(cfg.reward_model) if Path(cfg.reward_model).is_dir() else None
    stage = (manifest or {}).get("stage")
    implicit = next(iter(cfg.reward.of_kind("implicit")), None)
    if implicit is None and stage in LANGUAGE_MODEL_STAGES:
        raise ConfigError(
            "reward_model",
            f"{cfg.reward_model} is a {stage} stage's output, a language model with no scalar head; read it as "
            "a DPO model's implicit reward: reward.sources.<name>={kind: implicit, beta: <DPO's beta>}",
        )
    if implicit is not None and stage == "rm":
        raise ConfigError(
            f"reward.sources.{implicit}",
            f"is of kind implicit, which reads a DPO output, but reward_model {cfg.reward_model} is a reward "
            "model with a scalar head: use kind model",
        )
    trained_against = (manifest or {}).get("init_from")
    reference = cfg.reference or cfg.policy
    if implicit is not None and trained_against and path_identity(trained_against) != path_identity(reference):
        log.warning(
            "reward_model %s learnt its implicit reward against %s, but PPO's reference is %s: the reward is "
            "beta * log(pi_DPO / pi_ref) only against the model DPO started from",
            cfg.reward_model,
            trained_against,
            reference,
        )


def _check_same_tokenizer(policy_tok, other_tok, name: str, key: str) -> None:
    if policy_tok.get_vocab() != other_tok.get_vocab():
        raise ConfigError(
            key,
            f"{name} uses a different tokenizer than the policy; PPO scores the "
            "policy's tokens directly, so both must come from the same base model",
        )
