"""CPO (Xu et al. 2024) and SimPO (Meng et al. 2024) through TRL's CPOTrainer, which TRL 1.16 keeps
in trl.experimental.cpo: reference-free losses on the policy's own log-probs of the chosen and the
rejected answer; `loss.type: simpo` is SimPO (per-token mean log-probs, target margin γ).

    accelerate launch launch/stage3_cpo.py --config configs/tiny/simpo.yaml policy=runs/x/sft
"""

from __future__ import annotations

from trl.experimental.cpo import CPOConfig, CPOTrainer

from rlhf.config import CPOStageConfig
from rlhf.data.lengths import context_length
from rlhf.hf_trainer import trainer_kwargs
from rlhf.precision import Precision
from stages.dpo.train import encode_dpo_pairs
from stages.preference.paired import TokenRows, limit_and_label, trainer_settings
from stages.preference.train import Method, train_preference
from stages.reward.pairs import preference_pairs


class TokenCPOTrainer(TokenRows, CPOTrainer):
    """TRL's CPOTrainer on pairs we tokenise ourselves (stages/preference/paired.py)."""


def cpo_args(cfg: CPOStageConfig, out, precision: Precision, max_length: int) -> CPOConfig:
    return CPOConfig(
        **trainer_kwargs(out, cfg.seed, cfg.optim, cfg.train, cfg.model_init, precision, cfg.tracking.progress),
        loss_type=cfg.loss.type,
        beta=cfg.loss.beta,
        simpo_gamma=cfg.loss.gamma,
        cpo_alpha=cfg.loss.alpha,
        label_smoothing=cfg.loss.label_smoothing,
        **trainer_settings(max_length),
    )


def build_cpo_trainer(cfg, policy, ref_policy, tokenizer, out, precision, train_ds, eval_ds) -> CPOTrainer:
    return TokenCPOTrainer(
        model=policy,
        args=cpo_args(cfg, out, precision, context_length(cfg.data, tokenizer)),  # null: the model's context
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )


def train(cfg: CPOStageConfig) -> dict:
    """Stage 3 by CPO or SimPO (loss.type): reference-free preference losses."""
    # the stage's name is the loss's family: simpo for SimPO, cpo for the others
    method = Method(
        name="simpo" if cfg.loss.type == "simpo" else "cpo",
        load=preference_pairs,
        encode=encode_dpo_pairs,
        limit=limit_and_label,
        build_trainer=build_cpo_trainer,
        reference=False,
    )
    return train_preference(cfg, method)
