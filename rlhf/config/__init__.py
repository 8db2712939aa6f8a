"""Typed, validated configs: shared parts composed per stage, loaded from YAML + overrides."""

from rlhf.config.parts import (
    DataConfig,
    GenerationConfig,
    LoraConfig,
    ModelInit,
    OptimConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from rlhf.config.schema import ConfigError, config_hash, dump_yaml, load_config, to_dict
from rlhf.config.stages import (
    NOT_HASHED,
    WEIGHTS_NEUTRAL,
    CPOStageConfig,
    DPOStageConfig,
    KTOStageConfig,
    LabelStageConfig,
    ORPOStageConfig,
    PPOStageConfig,
    RMStageConfig,
    RolloutConfig,
    SFTStageConfig,
)

__all__ = [
    "NOT_HASHED",
    "WEIGHTS_NEUTRAL",
    "CPOStageConfig",
    "ConfigError",
    "DPOStageConfig",
    "DataConfig",
    "GenerationConfig",
    "KTOStageConfig",
    "LabelStageConfig",
    "LoraConfig",
    "ModelInit",
    "ORPOStageConfig",
    "OptimConfig",
    "PPOStageConfig",
    "RMStageConfig",
    "RolloutConfig",
    "SFTStageConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_hash",
    "dump_yaml",
    "load_config",
    "to_dict",
]
