"""One config per stage, composed from the shared parts.

Where defaults live: a field's default here (and in parts.py) is the generic value it takes when no
YAML sets it (mostly the common libraries' choices, e.g. AdamW's betas, TRL's DPO lr; no task;
max_length the model's context; the model names the built-in tiny model), not a tuned recipe. They
are the generic defaults: a stage run without --config (`rlhf sft model=... data.train=...`) uses
them, for a pretrained model and your own data. A recipe is a YAML under configs/:
configs/tiny/*.yaml is the tiny CPU default (docs/tiny-default.md) and names its task and every
value it tuned; a variant names it in `base:` and holds only what it changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.parts import (
    DataConfig,
    GenerationConfig,
    HubConfig,
    LoraConfig,
    ModelInit,
    OptimConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from rlhf.config.rewards import MOVED_REWARD_KEYS, ModelSourceConfig, RewardSourceConfig
from rlhf.config.schema import ConfigError
from rlhf.tasks import TASKS

# Keys (dotted) that never change what a stage computes: left out of the config hash that
# decides whether a finished stage can be reused, and out of a checkpoint's. How patiently the
# reward client waits is one: raising a remote source's timeout after a failure must resume the run,
# not restart it (which model the server scores with is checked by its fingerprint instead).
NOT_HASHED = (
    "output_dir",
    "tracking",
    "hub",
    "reward.sources.*.timeout",  # `*`: every source (rlhf/config/schema.py config_hash)
    "reward.sources.*.retries",
    "reward.sources.*.backoff",
)
# Keys (dotted) that cannot change the trained weights, also left out of the hash a resumable
# checkpoint is tied to (rlhf/checkpoint.py `checkpoint_digest`): changing how often a run logs,
# saves or evaluates, or the held-out evaluation's own settings, resumes it. Evaluation never
# touches the training state: the Trainer evaluates without sampling and re-seeds at its start
# (after SFT's `evaluate_base`); PPO's held-out generation is greedy unless generation.do_sample,
# in which case `checkpoint_digest` keeps `generation` and `train.eval_every` (sampling would draw
# from the training RNG). As torchtune's recipes do, these are not part of what a checkpoint is.
WEIGHTS_NEUTRAL = (
    "train.log_every",
    "train.save_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "train.resume",
    "generation",
    "evaluate_base",
    "data.max_eval_examples",
)


@dataclass(frozen=True)
class SFTStageConfig:
    """Stage 1: supervised fine-tuning; cross-entropy on the completion / assistant tokens."""

    model: str = "tiny"  # registry preset, local directory (e.g. an earlier stage's output) or hub id
    output_dir: str = "runs/sft"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # held-out evaluation
    evaluate_base: bool = True  # also score the starting model on both held-out splits (eval.json "base")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)


@dataclass(frozen=True)
class PairsConfig:
    """Built-in preference pairs for the task (used when data.train / data.eval are null). The kinds
    are checked against the task's by RMStageConfig, which knows both."""

    train_size: int = 20_000
    eval_size: int = 1_000
    kinds: tuple[str, ...] | None = None  # kinds of wrong answers (the task's WRONG_KINDS); null: all of them
    # relative chance of each kind in training pairs, e.g. {wrong_digit: 2}; unnamed kinds weigh 1
    # (held-out pairs always draw kinds uniformly)
    train_kind_weights: dict[str, float] = field(default_factory=dict)
    onpolicy_fraction: float = 0.0  # share of train pairs whose rejected answer is the init model's own wrong sample
    onpolicy_samples: int = 4  # samples per prompt when mining on-policy mistakes
    onpolicy_temperature: float = 1.0
    # pair files (any preference format) added to the training / held-out pairs above: e.g. an RLHF
    # round's comparisons of the policy's samples (runs/<name>/round-2/label/pairs.jsonl)
    extra_train: tuple[str, ...] = ()
    extra_eval: tuple[str, ...] = ()
    # times each extra_train pair enters the training pairs: a round's few hundred comparisons
    # among ~40,000 generated pairs are ~1.5 % of them, too few to move a continued RM (docs/rounds.md)
    extra_train_repeat: int = 1

    def check(self) -> None:
        if not 0.0 <= self.onpolicy_fraction <= 1.0:
            raise ConfigError("onpolicy_fraction", f"must be in [0, 1], got {self.onpolicy_fraction}")
        if self.extra_train_repeat < 1:
            raise ConfigError("extra_train_repeat", f"must be >= 1, got {self.extra_train_repeat}")
        for k, w in self.train_kind_weights.items():
            if not w > 0:
                raise ConfigError("train_kind_weights", f"weight of {k!r} must be > 0, got {w}")

    def kind_weights(self, kinds: tuple[str, ...] | None = None) -> list[float]:
        """One training weight per entry of `kinds` (default: the configured ones)."""
        return [float(self.train_kind_weights.get(k, 1.0)) for k in (kinds or self.kinds or ())]


@dataclass(frozen=True)
class RewardLossConfig:
    """L = −log σ(r_chosen − r_rejected − m) (+ centering); see stages/reward/loss.py."""

    use_margin: bool = True  # subtract a pair's `margin` field when the data has one
    center_coef: float | None = None  # weight of mean((r_c + r_r)^2), pulls rewards toward 0 (Eisenstein et al. 2023)
    # weight of the language-model loss on the chosen responses, read through the tied input
    # embeddings: keeps the body able to produce the right answer while it learns to rank them
    # (Yang et al. 2024, "Regularizing hidden states"); 0: off
    lm_coef: float = 0.0

    def check(self) -> None:
        if not self.lm_coef >= 0:
            raise ConfigError("lm_coef", f"must be >= 0, got {self.lm_coef}")


@dataclass(frozen=True)
class RMStageConfig:
    """Stage 2: reward model = the same decoder with a scalar head, trained on chosen/rejected pairs."""

    model: str = "tiny"  # usually the SFT output, e.g. runs/x/sft
    output_dir: str = "runs/rm"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    def check(self) -> None:
        _check_pair_kinds(self.task, self.pairs)


def _check_pair_kinds(task: TaskConfig, pairs: PairsConfig) -> None:
    """The kinds of wrong answers named in `pairs` must be the task's (stages that read pairs: RM, DPO)."""
    if task.name is None:
        return  # no generated pairs
    known = TASKS[task.name].wrong_kinds
    for key, kinds in (
        ("pairs.kinds", pairs.kinds or ()),
        ("pairs.train_kind_weights", pairs.train_kind_weights),
    ):
        for k in kinds:
            if k not in known:
                raise ConfigError(key, f"unknown kind {k!r} for task {task.name!r}; known: {list(known)}")


@dataclass(frozen=True)
class RolloutConfig:
    """Step 1 of PPO: how many prompts are answered per iteration, and how."""

    # distinct prompts per process and step; each is answered samples_per_prompt times, so a step holds
    # prompts_per_step × samples_per_prompt episodes per process (ppo.minibatches must divide that)
    prompts_per_step: int = 64
    samples_per_prompt: int = 1  # n responses per prompt, adjacent in the batch: the group estimators' groups
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0)
    )
    # Take the rollout's log-probs (of softmax(logits / T)) from the sampling
    # pass instead of one more forward of the policy over prompt + response. null (auto): when the
    # policy computes in fp32; in bf16 the KV-cached pass rounds differently from the training
    # forward, so the first PPO ratio would not be 1. true is refused with an engine of its own (vllm)
    # and with importance_correction: tis, where π_old must be a trainer forward.
    logprobs_from_generation: bool | None = None
    # the rollout engine (stages/ppo/engines.py): hf = transformers' KV-cached generate on the trained module;
    # vllm = vLLM colocated in each process with its own weights, synced after every optimizer phase (the
    # `vllm` extra); auto = vllm when installed and on a GPU, else hf
    engine: Literal["hf", "vllm", "auto"] = "hf"
    vllm_gpu_memory: float = 0.3  # fraction of the GPU vLLM takes (weights + KV cache); GPU only
    # GPUs per vLLM engine (GPU only): 1, one engine on each process's own GPU; t > 1, each t consecutive
    # processes share one engine spread over their t GPUs (tensor parallel, as TRL's colocated mode), for a
    # policy too large for one GPU's vllm_gpu_memory share. Must divide the number of processes.
    vllm_tensor_parallel: int = 1
    # The engine's sampling pass and the trainer's forward differ a little (other kernels, bf16 rounding), so
    # the tokens are slightly off-policy. tis: truncated importance sampling (Yao et al. 2025, as veRL and TRL):
    # each token's policy loss is weighted by min(π_trainer / π_engine, tis_cap), both of the sampled token.
    # Needs the engine's log-probs (asked for whenever this is on). none: no correction.
    importance_correction: Literal["none", "tis"] = "none"
    tis_cap: float = 2.0
    # DAPO's dynamic sampling (Yu et al. 2025, §3.2): drop the groups whose scores are all equal (they give every
    # response a zero advantage) and sample more prompts until the batch is full, at most max_sampling_tries
    # rounds; a batch still short then is filled up with dropped groups. Needs samples_per_prompt > 1.
    dynamic_sampling: bool = False
    max_sampling_tries: int = 4
    # Episodes per no-grad forward of the rollout (step 2's policy log-probs, reference log-probs and
    # values, step 3's reward model), so that fp32 full-vocabulary logits exist for this many rows at a
    # time, not the whole batch; the results are the same (to fp32 rounding). null: the whole batch at once.
    forward_batch_size: int | None = None

    @property
    def episodes_per_step(self) -> int:
        """Episodes per process and step: prompts_per_step × samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt

    def check(self) -> None:
        if self.prompts_per_step < 1 or self.samples_per_prompt < 1:
            raise ConfigError("samples_per_prompt", "prompts_per_step and samples_per_prompt must be positive")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ConfigError("dynamic_sampling", "drops groups of equal scores: needs samples_per_prompt > 1")
        if not 0.0 < self.vllm_gpu_memory <= 1.0:
            raise ConfigError("vllm_gpu_memory", f"must be in (0, 1], got {self.vllm_gpu_memory}")
        if self.vllm_tensor_parallel < 1:
            raise ConfigError("vllm_tensor_parallel", f"must be >= 1 GPUs per engine, got {self.vllm_tensor_parallel}")
        if self.tis_cap < 1.0:
            raise ConfigError("tis_cap", f"must be >= 1 (it caps π_trainer / π_engine), got {self.tis_cap}")
        if self.max_sampling_tries < 1:
            raise ConfigError("max_sampling_tries", f"must be >= 1, got {self.max_sampling_tries}")
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ConfigError("forward_batch_size", f"must be >= 1 episodes, or null, got {self.forward_batch_size}")
        if self.logprobs_from_generation and self.importance_correction == "tis":
            # π_old would be the sampler's own log-probs: every weight min(π_old / π_engine, C) is 1
            raise ConfigError(
                "importance_correction",
                "tis weighs π_old (a trainer forward) against the sampler's log-probs; with "
                "logprobs_from_generation=true they are the same numbers and every weight is 1: set it to null",
            )
        if self.logprobs_from_generation and self.engine == "vllm":
            raise ConfigError(
                "logprobs_from_generation",
                "must not be true with the vllm engine: PPO's π_old must be a forward of the trained "
                "module, not another copy's kernels (their gap is rollout/logprob_diff_*); set it to null",
            )
        # PPO's ratio and the KL penalty need the log-prob of each token under the distribution it
        # was sampled from; the training forward computes the full softmax(logits / T). Truncated
        # (top-k / top-p) or greedy sampling draws from another distribution, which would make the
        # rollout silently off-policy; like OpenRLHF and veRL we require plain sampling.
        gen = self.generation
        if not gen.do_sample:
            raise ConfigError(
                "generation.do_sample",
                "must be true: PPO learns from samples of softmax(logits / temperature); greedy "
                "responses are not drawn from the distribution whose log-probs the update uses",
            )
        if gen.top_k != 0 or gen.top_p != 1.0:
            raise ConfigError(
                "generation.top_k" if gen.top_k != 0 else "generation.top_p",
                f"must be off (top_k: 0, top_p: 1.0), got top_k={gen.top_k}, top_p={gen.top_p}: truncated "
                "sampling draws from another distribution than the full softmax whose log-probs PPO's ratio "
                "and KL use, so the rollout would be off-policy; lower rollout.generation.temperature instead",
            )


# the advantage estimators (stages/ppo/advantages.py) that divide a group's rewards by their std, so that a KL
# in the reward sets the scale instead of being weighed by β; the others subtract a baseline and keep β
GROUP_STD_ESTIMATORS = ("grpo",)


@dataclass(frozen=True)
class PPOConfig:
    """The PPO update (InstructGPT; Ziegler et al. 2019). Losses in stages/ppo/core_algos.py."""

    epochs: int = 2  # passes over each rollout
    minibatches: int = 4  # per epoch; each is split further by train.grad_accum
    clip_range: float = 0.2  # ε of the clipped surrogate (seed 003)
    # DAPO's clip-higher (Yu et al. 2025, §3.1): clip ρ to [1 − clip_range_low, 1 + clip_range_high] (e.g. 0.2 and
    # 0.28), so unlikely tokens can still rise; null: clip_range
    clip_range_low: float | None = None
    clip_range_high: float | None = None
    value_clip_range: float | None = 0.2  # clip of value predictions around the rollout's; null: off
    vf_coef: float = (
        1.0  # weight of the value loss (policy and value have separate lrs; this matters for shared clipping)
    )
    entropy_coef: float = 0.0  # weight of the entropy bonus
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    # stages/ppo/advantages.py ESTIMATORS: gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline (docs/ppo.md
    # table), and any registered with @register_estimator; one needing no critic builds no value model; grpo,
    # dr_grpo, rloo and reinforce_pp_baseline need rollout.samples_per_prompt > 1. Checked when the stage starts
    advantage_estimator: str = "gae"
    # whiten the advantages over the batch; null: as the estimator does it (gae and reinforce_pp*: yes; the group
    # estimators grpo, dr_grpo, rloo: no)
    whiten_advantages: bool | None = None
    # Where the KL(policy‖ref) penalty goes, and its per-token estimator (Schulman 2020); only these regularise:
    #   reward + k1: −β·k1 per token in the reward, whose policy gradient is that of β·KL (InstructGPT)
    #   loss + k3:   β·k3 of the current policy's log-probs added to the loss (GRPO, Shao et al. 2024, eq. 4)
    #   loss + k2:   β·k2 in the loss: its gradient is exactly that of β·KL (Tang & Munos 2025)
    # refused: k2/k3 in the reward (their gradient through the reward is biased) and k1 in the loss (its gradient,
    # ∇log π, is zero in expectation: nothing pulls the policy back)
    kl_in: Literal["reward", "loss"] = "reward"
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_coef: float = 0.05  # β (initial β when kl_target is set)
    kl_target: float | None = None  # adaptive β toward this KL per sequence (Ziegler et al. 2019); null: fixed β
    kl_horizon: int = 10_000  # episodes over which the adaptive controller moves β
    max_approx_kl: float | None = None  # stop the epoch loop early when approx KL of an update exceeds this
    value_warmup_steps: int = 0  # first iterations train the value model only (policy lr 0): better advantages
    # how the per-token losses become one number (stages/ppo/core_algos.py aggregate_loss): token_mean over the
    # minibatch's tokens (DAPO; what PPO here always did), seq_mean_token_mean (GRPO's per-response mean) or
    # seq_mean_token_sum_norm (each response's sum / rollout.generation.max_new_tokens; Dr. GRPO)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    # the policy loss, by its name in stages/ppo/core_algos.py POLICY_LOSSES: clip, PPO's clipped surrogate (the
    # only built-in); outside code registers more with @register_policy_loss (docs/ppo.md, "The seams")
    policy_loss: str = "clip"
    # leave responses cut off at max_new_tokens (no EOS) out of the loss: their score judges an unfinished
    # answer (DAPO's overlong filtering, Yu et al. 2025, §3.4)
    mask_truncated: bool = False

    def check(self) -> None:
        if self.epochs <= 0 or self.minibatches <= 0:
            raise ConfigError("epochs", "epochs and minibatches must be positive")
        if not 0.0 < self.clip_range < 1.0:
            raise ConfigError("clip_range", f"must be in (0, 1), got {self.clip_range}")
        if self.clip_range_low is not None and not 0.0 < self.clip_range_low < 1.0:
            raise ConfigError("clip_range_low", f"must be in (0, 1), got {self.clip_range_low}")
        if self.clip_range_high is not None and not self.clip_range_high > 0.0:
            raise ConfigError("clip_range_high", f"must be > 0, got {self.clip_range_high}")
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ConfigError("kl_estimator", "k1 in the loss has zero expected gradient (no regularisation); use k3")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError("gamma", "gamma and lam must be in [0, 1]")
        if self.kl_coef < 0:
            raise ConfigError("kl_coef", f"must be >= 0, got {self.kl_coef}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError("kl_target", f"must be positive, got {self.kl_target}")
        if self.kl_in == "reward" and self.kl_coef > 0 and self.advantage_estimator in GROUP_STD_ESTIMATORS:
            # the group's std then holds β·Σ KL: scores [1, 1, 1, 1] with KL sums [0.5, 1, 1.5, 2] give
            # advantages ±1.16 and ±0.39 from KL noise alone, whatever β is (DeepSeekMath §4.1: KL in the loss)
            raise ConfigError(
                "kl_in",
                f"reward is refused with advantage_estimator {self.advantage_estimator}: it divides each group by "
                "its std, which cancels β and turns KL noise into advantages; use ppo.kl_in=loss ppo.kl_estimator=k3",
            )
        if self.kl_in == "reward" and self.kl_estimator != "k1":
            # In the reward the penalty reaches the policy only through the score function
            # ∇log π · KL: its expectation is ∇KL for k1, but k2 = r²/2 and k3 = e^{−r} − 1 + r are
            # ~0 near the reference (second order in r), so they barely regularise. k3 is a loss term
            # (GRPO; veRL's use_kl_loss), which is `ppo.kl_in: loss`'s job, not the reward's.
            raise ConfigError(
                "kl_estimator",
                f"{self.kl_estimator} is refused as a reward penalty: its score-function gradient is ~0 near the "
                "reference, so it barely regularises; use k1 in the reward, or put k3 in the loss "
                "(ppo.kl_in: loss). train/ppo/kl_k3 is logged either way",
            )


@dataclass(frozen=True)
class PPORewardConfig:
    """Step 3 of PPO: the sequence score = Σ weight · score over `sources` (+ the shaping terms below);
    the sources' kinds and settings: rlhf/config/rewards.py, docs/rewards.md."""

    MOVED_KEYS = MOVED_REWARD_KEYS  # reward.model_weight / rules / functions / remote: one line each, naming sources

    # name -> {kind, weight, …}, added in this order; each logged as train/reward/<name>. A variant
    # drops a base's source with `name: null`. The default: the learned reward model alone (RLHF).
    sources: dict[str, RewardSourceConfig | None] = field(
        default_factory=lambda: {"rm": ModelSourceConfig(kind="model", weight=1.0)}
    )
    normalize: Literal["none", "batch", "running"] = "none"  # whiten scores per batch or by running stats
    clip: float | None = None  # clip scores to [-clip, clip] after normalisation
    missing_eos_penalty: float | None = -1.0  # added to the score of a response that never emitted EOS
    # DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a response longer than max_new_tokens − L (L =
    # overlong_buffer tokens) loses overlong_penalty · (length − (max_new_tokens − L)) / L, linearly up to the full
    # penalty at max_new_tokens; logged as train/reward/overlong; null: off
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0

    def active(self) -> dict[str, RewardSourceConfig]:
        """The configured sources, without those a variant dropped (`name: null`)."""
        return {name: source for name, source in self.sources.items() if source is not None}

    def of_kind(self, kind: str) -> dict[str, RewardSourceConfig]:
        return {name: source for name, source in self.active().items() if source.kind == kind}

    def check(self) -> None:
        for name, source in self.active().items():
            if name == "overlong":
                raise ConfigError(f"sources.{name}", "is the overlong penalty's name in the logs; call it otherwise")
            try:
                source.check_named(name)
            except ConfigError as e:
                raise ConfigError(f"sources.{name}.{e.key}", e.message) from None
        for kind, why in (("model", "the stage has one reward_model"), ("remote", "its fingerprint is recorded")):
            if len(self.of_kind(kind)) > 1:
                raise ConfigError(
                    "sources", f"at most one source of kind {kind} ({why}), got {list(self.of_kind(kind))}"
                )
        on_reward_model = [*self.of_kind("model"), *self.of_kind("implicit")]
        if len(on_reward_model) > 1:
            raise ConfigError(
                "sources",
                f"{on_reward_model} all read the one reward_model: a scalar-head RM (kind model) or a DPO "
                "model (kind implicit), not both",
            )
        if self.overlong_buffer is not None and self.overlong_buffer < 1:
            raise ConfigError("overlong_buffer", f"must be >= 1 token (or null: off), got {self.overlong_buffer}")
        if self.overlong_penalty < 0:
            raise ConfigError("overlong_penalty", f"must be >= 0, got {self.overlong_penalty}")


@dataclass(frozen=True)
class PPOTrainConfig(TrainConfig):
    """The loop, and which policy the stage writes out."""

    # null: the last step's policy. gold / proxy: the policy of the held-out evaluation (every
    # train.eval_every steps, and the last step) with the best task accuracy (the checker) or the best
    # reward-model score (the proxy PPO optimises; Gao et al. 2022 show it can rise while gold falls)
    keep_best: Literal["gold", "proxy"] | None = None


@dataclass(frozen=True)
class PPOStageConfig:
    """Stage 3: PPO on the policy with a KL penalty to the frozen reference."""

    policy: str = "tiny"  # the SFT output; also the frozen reference unless `reference` names another
    # null: the policy above. An RLHF round starting from the last round's policy may keep the SFT
    # model as its reference instead (the pipeline's round.reference); must share the tokenizer.
    reference: str | None = None
    # the RM output (a `model` reward source scores with it), or a DPO output (an `implicit` source's
    # model); null: no reward model
    reward_model: str | None = None
    value_model: str | None = None  # null: initialise from the reward model (or the policy if there is none)
    # true: the value model is a linear head on the policy's own last hidden state instead of a second
    # decoder: one forward per minibatch instead of two, no second model or its optimizer state; the
    # value loss then also trains the policy's trunk (weighed by ppo.vf_coef). value_model must be null.
    share_policy_trunk: bool = False
    output_dir: str = "runs/ppo"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)  # prompts: any SFT format, only the prompt is used
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: PPORewardConfig = field(default_factory=PPORewardConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))  # the policy
    value_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))  # the value model
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # held-out evaluation (greedy)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    @property
    def scalar_reward_model(self) -> str | None:
        """The reward model as a scalar-head model (the RM stage's output): `reward_model` unless an
        `implicit` source reads it as a DPO model."""
        return None if self.reward.of_kind("implicit") else self.reward_model

    def check(self) -> None:
        if self.reference is not None and self.lora.enabled:
            raise ConfigError("reference", "must be null with LoRA: the reference is the policy with its adapter off")
        if self.train.keep_best and not self.train.eval_every:
            raise ConfigError("train.keep_best", "chooses among held-out evaluations: set train.eval_every > 0")
        if self.train.keep_best == "proxy" and self.scalar_reward_model is None:
            raise ConfigError(
                "train.keep_best",
                "proxy reads a scalar-head reward model's score; reward_model is null or read as implicit",
            )
        if self.reward_model is None and (self.reward.of_kind("model") or self.reward.of_kind("implicit")):
            name = next(iter({**self.reward.of_kind("model"), **self.reward.of_kind("implicit")}))
            raise ConfigError(
                "reward_model",
                f"is null but reward.sources.{name} is the reward model; set one or drop it ({name}: null)",
            )
        if not self.reward.active():
            raise ConfigError("reward.sources", "no reward source: nothing to optimise")
        if self.share_policy_trunk and self.value_model is not None:
            raise ConfigError("value_model", "must be null with share_policy_trunk: the value head sits on the policy")
        if self.rollout.episodes_per_step % self.ppo.minibatches:
            raise ConfigError(
                "ppo.minibatches",
                f"must divide the {self.rollout.episodes_per_step} episodes per step "
                "(rollout.prompts_per_step × rollout.samples_per_prompt)",
            )
        max_new = self.rollout.generation.max_new_tokens
        if self.data.max_length is not None and max_new >= self.data.max_length:
            raise ConfigError(
                "data.max_length",
                f"must exceed rollout.generation.max_new_tokens ({max_new}): it holds prompt + response",
            )
        if self.reward.overlong_buffer is not None and self.reward.overlong_buffer >= max_new:
            raise ConfigError("reward.overlong_buffer", f"must be below rollout.generation.max_new_tokens ({max_new})")
        minibatch = self.rollout.episodes_per_step // self.ppo.minibatches
        if minibatch % self.train.grad_accum:
            # every minibatch must be exactly one optimizer step of grad_accum equal micro-batches
            # (veRL asserts the same); otherwise accelerate / DeepSpeed step mid-minibatch
            raise ConfigError(
                "train.grad_accum",
                f"must divide the minibatch ({self.rollout.episodes_per_step} episodes per step / ppo.minibatches "
                f"{self.ppo.minibatches} = {minibatch}), got {self.train.grad_accum}",
            )


# TRL 1.16's DPOTrainer loss types that compare a chosen and a rejected answer (its `sft` term is
# `loss.sft_coef` here; `aot_unpaired` and `apo_down` are left out: they ignore the pairing or
# assume chosen answers worse than the model's own, neither of which fits pairs of a right and a
# wrong answer).
DPOLossType = Literal[
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "discopop",
    "sigmoid_norm",
]
_SMOOTHED = ("robust", "exo_pair", "aot")  # the loss types that read label_smoothing


@dataclass(frozen=True)
class DPOLossConfig:
    """The DPO family of losses on log-ratios r = log π(y|x) − log π_ref(y|x) of the chosen and the
    rejected answer, as TRL's DPOTrainer computes them (its `loss_type`)."""

    # sigmoid: −log σ(β(r_c − r_r)) (Rafailov et al. 2023); ipo: (Δ/len − 1/(2β))², per-token
    # log-ratios (Azar et al. 2023); hinge: max(0, 1 − β(r_c − r_r)) (SLiC, Zhao et al. 2023);
    # robust: sigmoid with label noise ε (Chowdhury et al. 2024); exo_pair (Ji et al. 2024);
    # nca_pair (Chen et al. 2024); bco_pair (Jung et al. 2024); sppo_hard (Wu et al. 2024);
    # aot (Melnyk et al. 2024); apo_zero (D'Oosterlinck et al. 2024); discopop (Lu et al. 2024);
    # sigmoid_norm: sigmoid on per-token log-ratios
    type: DPOLossType = "sigmoid"
    # β: how far the policy may move from the reference (higher: closer); for ipo, IPO's τ
    beta: float = 0.1
    # ε, the share of pairs assumed mislabelled (robust: [0, 0.5); exo_pair: > 0, 1e-3 in the
    # paper; aot); refused with the other types, which would ignore it
    label_smoothing: float = 0.0
    # weight of the NLL of the chosen answers added to the preference loss (RPO: Pang et al. 2024,
    # "Iterative Reasoning Preference Optimization", §2: without it DPO lowers the likelihood of the
    # right answers on maths too); 0: off
    sft_coef: float = 0.0

    def check(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        if not self.sft_coef >= 0:
            raise ConfigError("sft_coef", f"must be >= 0, got {self.sft_coef}")
        if self.label_smoothing and self.type not in _SMOOTHED:
            raise ConfigError("label_smoothing", f"is not read by loss type {self.type!r}; only by {list(_SMOOTHED)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.type == "exo_pair" and self.label_smoothing == 0:
            raise ConfigError("label_smoothing", "must be > 0 with exo_pair (the EXO paper uses 1e-3)")


@dataclass(frozen=True)
class DPOStageConfig:
    """DPO, the other road from SFT (instead of RM + PPO): the policy learns from chosen/rejected
    pairs directly, against the frozen SFT model as reference (Rafailov et al. 2023)."""

    policy: str = "tiny"  # the SFT output; also the frozen reference (with LoRA: the policy, adapter off)
    output_dir: str = "runs/dpo"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)  # preference pairs, any stage-2 format; null: the task's
    task: TaskConfig = field(default_factory=TaskConfig)  # generated pairs and the held-out accuracy
    pairs: PairsConfig = field(default_factory=PairsConfig)  # as stage 2; onpolicy_fraction: the SFT model's mistakes
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's DPO default
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # held-out evaluation (greedy)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    def check(self) -> None:
        _check_pair_kinds(self.task, self.pairs)


@dataclass(frozen=True)
class LabellerConfig:
    """Who compares the sampled responses (stages/reward/labellers.py)."""

    name: Literal["rule", "function", "judge"] = "rule"  # rule: the task's checker, standing in for raters
    function: str = ""  # for `function`: "package.module:function(prompt, a, b) -> 0 | 1 | None"
    judge: str = ""  # for `judge`: a causal LM (preset, directory or hub id) that picks A or B
    principle: str = "The better response answers the question correctly and says nothing else."
    # other labellers run on the same samples only to measure their agreement with the task's
    # checker (eval.json's <name>_gold_agreement), e.g. [judge] beside the rule: RLAIF's agreement
    compare: tuple[Literal["rule", "function", "judge"], ...] = ()

    def check(self) -> None:
        used = (self.name, *self.compare)
        if "function" in used and ":" not in self.function:
            raise ConfigError("function", f"labeller 'function' needs 'package.module:function', got {self.function!r}")
        if "judge" in used and not self.judge:
            raise ConfigError("judge", "labeller 'judge' needs a model (preset, directory or hub id)")


@dataclass(frozen=True)
class LabelStageConfig:
    """An RLHF round's comparisons: the policy's samples on fresh prompts, labelled, as stage-2 pairs."""

    policy: str = "runs/tiny/ppo"  # the policy whose samples are compared (the last round's PPO output)
    reward_model: str | None = None  # the reward model before the refresh: its accuracy on the new pairs
    output_dir: str = "runs/tiny/round-2/label"
    seed: int = 0
    round: int = 2  # fresh prompts per round: the task's training items drawn with seed offset 100 · round
    model_init: ModelInit = field(default_factory=ModelInit)
    data: DataConfig = field(default_factory=DataConfig)  # prompts (any SFT format); null: the task's
    task: TaskConfig = field(default_factory=TaskConfig)
    prompts: int = 512  # prompts whose samples become training pairs
    eval_prompts: int = 128  # further prompts whose pairs are held out (the RM's accuracy before and after)
    samples_per_prompt: int = 4  # K: a ranked list of K gives up to C(K, 2) pairs
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0)
    )
    labeller: LabellerConfig = field(default_factory=LabellerConfig)
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig
    )  # names set by the pipeline; nothing is logged per step

    def check(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError("samples_per_prompt", f"must be >= 2 to compare, got {self.samples_per_prompt}")
        if self.prompts <= 0 or self.eval_prompts < 0:
            raise ConfigError("prompts", "must be positive (eval_prompts >= 0)")


# The other preference methods of stage 3 (docs/preference-methods.md), through TRL's trainers.
# Each reads its data as DPO does (a file in any preference format or the task's generated pairs;
# KTO also unpaired thumbs-up/down records) and shares DPO's data, pairs, training and evaluation
# parts; only the loss differs.


@dataclass(frozen=True)
class KTOLossConfig:
    """KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization"): each
    answer alone, liked or not, against the frozen reference: desirable answers are pushed above a
    reference point z0 (a batch estimate of KL(π‖π_ref)), undesirable ones below it. TRL's
    KTOTrainer (stable API in TRL 1.16)."""

    # kto: the paper's loss (eq. 7); apo_zero_unpaired: APO-zero on unpaired data (D'Oosterlinck et al. 2024)
    type: Literal["kto", "apo_zero_unpaired"] = "kto"
    beta: float = 0.1  # how far π may move from the reference (higher: closer)
    # λ_D and λ_U (eq. 8): with n_D desirable and n_U undesirable answers, keep
    # λ_D·n_D / (λ_U·n_U) in [1, 4/3]; pairs unpaired give n_D = n_U, so 1 and 1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def check(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class ORPOLossConfig:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
    the NLL of the chosen answer minus λ·log σ(log odds(chosen) − log odds(rejected)), odds(y) =
    P(y|x) / (1 − P(y|x)) with P the mean per-token probability (eq. 6). No reference model, so it
    can start from a base model instead of an SFT one. TRL's trl.experimental.orpo.ORPOTrainer."""

    beta: float = 0.1  # λ, the weight of the odds-ratio term (TRL's `beta`; the paper's 0.1 to 1.0)

    def check(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")


@dataclass(frozen=True)
class CPOLossConfig:
    """CPO (Xu et al. 2024) and SimPO (Meng et al. 2024): reference-free losses on the policy's own
    log-probs of the chosen and rejected answer. TRL's trl.experimental.cpo.CPOTrainer.
    simpo: −log σ(β(avg log π(y_c) − avg log π(y_r)) − γ), per-token means (SimPO eq. 6);
    sigmoid: −log σ(β(log π(y_c) − log π(y_r))) (CPO eq. 3); hinge, ipo: as DPO's on the same
    difference. `alpha` adds the NLL of the chosen answers (CPO's BC term; SimPO uses 0)."""

    type: Literal["simpo", "sigmoid", "hinge", "ipo"] = "simpo"
    beta: float = 2.0  # SimPO's β (2.0 to 2.5 in the paper); CPO's 0.1
    gamma: float = 0.5  # SimPO's target margin γ (TRL's simpo_gamma); read by simpo only
    alpha: float = 0.0  # weight of the chosen answers' NLL (TRL's cpo_alpha): CPO 1.0, SimPO 0, CPO-SimPO 1.0
    label_smoothing: float = 0.0  # share of pairs assumed mislabelled (simpo and sigmoid)

    def check(self) -> None:
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        if not self.alpha >= 0:
            raise ConfigError("alpha", f"must be >= 0, got {self.alpha}")
        if self.label_smoothing and self.type not in ("simpo", "sigmoid"):
            raise ConfigError("label_smoothing", f"is not read by loss type {self.type!r}; only by simpo and sigmoid")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(frozen=True)
class KTOStageConfig:
    """KTO, stage 3 from unpaired thumbs-up/down data (or pairs, split into one liked and one
    disliked answer each), against the frozen SFT model as reference."""

    policy: str = "tiny"  # the SFT output; also the frozen reference (with LoRA: the policy, adapter off)
    output_dir: str = "runs/tiny/kto"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # {prompt, completion, label} records (docs/data.md), or pairs in any stage-2 format; null: the task's pairs
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # the task's generated pairs, as DPO's
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's KTO default
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # held-out evaluation (greedy)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    def check(self) -> None:
        _check_pair_kinds(self.task, self.pairs)
        if self.loss.type == "kto" and self.train.batch_size < 2:
            # z0 is estimated from the batch's mismatched (prompt, answer) pairs: one example has none
            raise ConfigError("train.batch_size", "must be >= 2 with loss.type kto (z0 comes from the batch)")


@dataclass(frozen=True)
class ORPOStageConfig:
    """ORPO: SFT and preference learning in one loss, no reference model (Hong et al. 2024)."""

    policy: str = "tiny"  # the starting model: a base model or an SFT output (no reference is kept)
    output_dir: str = "runs/tiny/orpo"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)  # pairs, any stage-2 format; null: the task's
    task: TaskConfig = field(default_factory=TaskConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: ORPOLossConfig = field(default_factory=ORPOLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's ORPO default
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    def check(self) -> None:
        _check_pair_kinds(self.task, self.pairs)


@dataclass(frozen=True)
class CPOStageConfig:
    """CPO and SimPO (`loss.type: simpo`): reference-free preference losses (Xu et al. 2024; Meng
    et al. 2024)."""

    policy: str = "tiny"  # the SFT output (no reference is kept)
    output_dir: str = "runs/tiny/simpo"
    seed: int = 0
    model_init: ModelInit = field(default_factory=ModelInit)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)  # pairs, any stage-2 format; null: the task's
    task: TaskConfig = field(default_factory=TaskConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: CPOLossConfig = field(default_factory=CPOLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's CPO default
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # push the output to the Hub (off)

    def check(self) -> None:
        _check_pair_kinds(self.task, self.pairs)
