"""The model registry: presets, and builders for the policy, reward and value models."""

from rlhf.registry.models import (
    ModelLoadError,
    ModelSource,
    backbone,
    build_policy,
    build_scalar_model,
    cast_trainable,
    config_of,
    fingerprint,
    last_token_index,
    load_tokenizer,
    merge_lora,
    policy_forward,
    policy_logits,
    position_ids_from_mask,
    prepare_tokenizer,
    resolve,
    score_head,
    sequence_scores,
    token_scores,
)
from rlhf.registry.presets import PRESETS, Preset
from rlhf.registry.tiny import build_tiny_tokenizer
from rlhf.registry.turns import end_of_turn_id, stop_token_ids

__all__ = [
    "PRESETS",
    "ModelLoadError",
    "ModelSource",
    "Preset",
    "backbone",
    "build_policy",
    "build_scalar_model",
    "build_tiny_tokenizer",
    "cast_trainable",
    "config_of",
    "end_of_turn_id",
    "fingerprint",
    "last_token_index",
    "load_tokenizer",
    "merge_lora",
    "policy_forward",
    "policy_logits",
    "position_ids_from_mask",
    "prepare_tokenizer",
    "resolve",
    "score_head",
    "sequence_scores",
    "stop_token_ids",
    "token_scores",
]
