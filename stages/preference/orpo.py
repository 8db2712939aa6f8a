"""ORPO (Hong et al. 2024) through TRL's ORPOTrainer, which TRL 1.16 keeps in trl.experimental.orpo:
the chosen answers' NLL and λ times the log-odds-ratio term, in one loss with no reference model.

    accelerate launch launch/stage3_orpo.py --config configs/tiny/orpo.yaml policy=runs/x/sft
"""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from rlhf.config import ORPOStageConfig
from rlhf.data.lengths import context_length
from rlhf.hf_trainer import trainer_kwargs
from rlhf.precision import Precision
from stages.dpo.train import encode_dpo_pairs
from stages.preference.paired import TokenRows, limit_and_label, trainer_settings
from stages.preference.train import Method, train_preference
from stages.reward.pairs import preference_pairs


class TokenORPOTrainer(TokenRows, ORPOTrainer):
    """TRL's ORPOTrainer on pairs we tokenise ourselves (stages/preference/paired.py)."""


def orpo_args(cfg: ORPOStageConfig, out, precision: Precision, max_length: int) -> ORPOConfig:
    return ORPOConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        beta=cfg.loss.beta,
        **trainer_settings(max_length),
    )


def build_orpo_trainer(cfg, policy, ref_policy, tokenizer, out, precision, train_ds, eval_ds) -> ORPOTrainer:
    return TokenORPOTrainer(
        model=policy,
        args=orpo_args(cfg, out, precision, context_length(cfg.data, tokenizer)),  # null: the model's context
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )


ORPO = Method(
    name="orpo",
    load=preference_pairs,
    encode=encode_dpo_pairs,
    limit=limit_and_label,
    build_trainer=build_orpo_trainer,
    reference=False,
)


def train(cfg: ORPOStageConfig) -> dict:
    """Stage 3 by ORPO: SFT and preference learning in one loss, no reference model."""
    return train_preference(cfg, ORPO)
