"""The config parts that every stage shares. Each field is documented once, here; its default is
a generic value, not the tiny recipe's (rlhf/config/stages.py says where defaults live).

Lists are tuples so that a loaded config is immutable; derived values (world size, global batch,
total steps) are computed where they are used, never written back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.config.schema import ConfigError
from rlhf.tasks import TASKS


def is_template_text(value: str) -> bool:
    """A chat template given inline rather than as a file path."""
    return "{{" in value or "{%" in value


def chat_template_text(value: str) -> str:
    """model_init.chat_template's Jinja text: the value itself, or the file it names."""
    return value if is_template_text(value) else Path(value).expanduser().read_text(encoding="utf-8")


@dataclass(frozen=True)
class ModelInit:
    """How a model's weights are loaded (any stage, any model the stage loads)."""

    # weights of frozen models; auto: bf16 on a GPU that has it, else fp32. What a stage trains is
    # held in fp32 (bf16 multiplies under autocast when this is bf16) unless DeepSpeed keeps fp32
    # master weights itself; float16 is refused. The rule lives in rlhf/precision.py.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust it
    revision: str | None = None  # hub branch, tag or commit
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flash_attention_2"; None: transformers' choice
    load_in_4bit: bool = False  # QLoRA: 4-bit base weights (needs bitsandbytes and a CUDA GPU; implies LoRA)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    # bf16: weights, gradients and optimizer state stay fp32 (trained) or `dtype` (frozen) while matrix
    # multiplies run in bf16 under autocast; on CPUs with AVX512-BF16 or AMX that is ~4x faster per
    # multiply. auto: bf16 on such a CPU (fp32 weights, no CUDA, no DeepSpeed), else null. null:
    # accelerate's own setting (`accelerate launch --mixed_precision`; fp16 refused), off by default. Under CPU
    # bf16 an unset attn_implementation becomes "sdpa_fp32": SDPA with autocast off, since bf16
    # attention scores slowed the tiny reward model's learning and PyTorch's CPU SDPA backward is
    # slow in bf16. GPUs get bf16 from dtype: auto instead (bf16 weights, or for what trains fp32
    # weights under bf16 autocast, which then sets this to bf16). The rule lives in rlhf/precision.py.
    mixed_precision: Literal["bf16", "auto"] | None = None
    # the tokenizer's chat template, replaced: a Jinja string (holds "{{" or "{%") or a file holding one,
    # for a model with none (else a plain "Role: text" template) or a wrong one; saved with each output
    chat_template: str | None = None

    def check(self) -> None:
        if self.chat_template is not None and not is_template_text(self.chat_template):
            if not Path(self.chat_template).expanduser().is_file():
                raise ConfigError(
                    "chat_template", f"{self.chat_template!r} is neither a file nor a Jinja template ('{{{{' or '{{%')"
                )
        # fp16 needs a loss scaler (its 5-bit exponent underflows small gradients to 0 and overflows
        # to inf, then NaN), which no stage runs; bf16 has fp32's range. See rlhf/precision.py.
        if self.dtype == "float16":
            raise ConfigError(
                "dtype", "float16 trains without a loss scaler and ends in NaN; use bfloat16 (same memory) or float32"
            )


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA: train low-rank A·B added to frozen weights (seed 003)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: the preset's list, else every linear layer
    merge_on_save: bool = False  # also write merged full weights to <output_dir>/merged

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError("r", f"must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


# The field names the data formats read (rlhf/data/sft.py, preference.py, prompts.py): what
# data.columns may map a column onto.
CANONICAL_FIELDS = (
    "prompt",
    "completion",
    "answer",
    "messages",
    "text",
    "query",
    "chosen",
    "rejected",
    "responses",
    "margin",
)


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from: a .jsonl/.json/.parquet file, a saved HF dataset directory or a
    hub dataset id. None means the task's built-in generated set (see `task`). docs/data.md."""

    # one source, or a list of them mixed by train_weights (eval and test take one source)
    train: str | tuple[str, ...] | None = None
    # per train source: w takes round(w · n) of its n records (0.5 a fixed random half, 2 each twice); null: all once
    train_weights: tuple[float, ...] | None = None
    # the data's column for a field the formats read, e.g. {prompt: question, chosen: good, rejected: bad};
    # applied to every split
    columns: dict[str, str] = field(default_factory=dict)
    dataset_config: str | None = None  # a hub dataset's configuration (load_dataset's `name`), e.g. "main"
    eval: str | None = None  # the validation split: in-loop evaluation, the choice of a checkpoint, any tuning
    # the test split: quoted in eval.json, the report and the summary, used by nothing else; null: the
    # task's generated test split (none without a task)
    test: str | None = None
    train_split: str = "train"  # split to read from a hub id or a saved DatasetDict
    eval_split: str = "test"
    test_split: str = "test"
    # tokens per example (prompt + response); null: the model's context, as its tokenizer states it
    # (model_max_length; 2048 where it states none), rlhf/data/lengths.py `context_length`
    max_length: int | None = None
    overlong: Literal["drop", "truncate"] = "drop"  # what to do with longer examples (counted in the log)
    max_eval_examples: int | None = None  # cap on validation examples (the test split is never cut)

    def check(self) -> None:
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError("max_length", f"must be positive, got {self.max_length}")
        self._check_sources()
        if self.test is not None and (self.test, self.test_split) == (self.eval, self.eval_split):
            raise ConfigError(
                "test",
                f"is the validation data ({self.eval!r}, split {self.eval_split!r}); the test split must be "
                "used by nothing else",
            )

    def _check_sources(self) -> None:
        sources = (self.train,) if isinstance(self.train, str) else self.train or ()
        if self.train is not None and not sources:
            raise ConfigError("train", "an empty list; give a source, or null for the task's generated set")
        if self.train_weights is not None:
            if len(self.train_weights) != len(sources):
                raise ConfigError(
                    "train_weights",
                    f"needs one weight per data.train source ({len(sources)}), got {len(self.train_weights)}",
                )
            if any(w < 0 for w in self.train_weights):
                raise ConfigError("train_weights", f"must be >= 0, got {list(self.train_weights)}")
        unknown = sorted(set(self.columns) - set(CANONICAL_FIELDS))
        if unknown:
            raise ConfigError(f"columns.{unknown[0]}", f"not a field the formats read; known: {list(CANONICAL_FIELDS)}")
        for name, column in self.columns.items():
            if not column.strip():
                raise ConfigError(f"columns.{name}", "empty column name")
        if len(set(self.columns.values())) < len(self.columns):
            raise ConfigError("columns", f"two fields read one column: {self.columns}")


@dataclass(frozen=True)
class TaskConfig:
    """A built-in task with a checker (rlhf/tasks: seed 000's subtraction, addition_reversed, constraints), which
    generates the training and held-out data when `data.train` / `data.eval` are null, and scores
    generations."""

    name: str | None = (
        None  # a key of rlhf.tasks.TASKS, e.g. subtraction; null: no task (your own data, loss-only eval)
    )
    train_size: int = 100_000
    train_digits: tuple[int, ...] = (2, 3, 4, 5)  # digit buckets for training items (seed: 2, 5, 10, 20)
    train_weights: tuple[float, ...] | None = None  # sampling weight per bucket; None: uniform
    eval_size: int = 400  # the validation split, over eval_digits: in-loop evaluation, checkpoint choice, tuning
    eval_digits: tuple[int, ...] = (2, 5)  # the seed's first two buckets (of both held-out splits)
    # the test split: items per bucket of eval_digits, drawn with test_seed, no validation item among
    # them, and left out of every generated training set (SFT items, RM and DPO pairs, PPO prompts);
    # eval.json, the report and the pipeline summary quote it. 1,000: one standard error is at most
    # 1.6 points (at accuracy 0.5), 1.3 at 0.8. 0: no test split (the validation split is quoted)
    test_per_bucket: int = 1000
    test_seed: int = 20261130  # must differ from data_seed (training) and data_seed + 1 (validation)
    fewshot: bool = False  # prompt with the seed's few-shot instruction instead of the plain question
    # the question's language: zh, the seed's prompt (the default); en, an English rendering for a
    # pretrained model that reads English better (subtraction only; docs/real-model.md)
    prompt_language: str = "zh"
    data_seed: int = 1234  # generated data depends on this, not on `seed`; the validation split uses data_seed + 1

    def check(self) -> None:
        if self.name is not None and self.name not in TASKS:
            raise ConfigError("name", f"unknown task {self.name!r}; known: {sorted(TASKS)} (or null for none)")
        if self.fewshot and self.name is not None and not TASKS[self.name].fewshot:
            raise ConfigError("fewshot", f"task {self.name!r} has no few-shot prompt")
        if self.prompt_language != "zh" and self.name is not None:
            known = TASKS[self.name].languages
            if self.prompt_language not in known:
                raise ConfigError(
                    "prompt_language",
                    f"task {self.name!r} has no {self.prompt_language!r} prompt; it has {list(known) or ['zh']}",
                )
        if self.train_weights is not None and len(self.train_weights) != len(self.train_digits):
            raise ConfigError("train_weights", "needs one weight per entry of train_digits")
        if any(d <= 0 for d in self.train_digits + self.eval_digits):
            raise ConfigError("train_digits", "digit counts must be positive")
        if self.test_per_bucket < 0:
            raise ConfigError("test_per_bucket", f"must be >= 0 (0: no test split), got {self.test_per_bucket}")
        if self.test_seed in (self.data_seed, self.data_seed + 1):
            which = (
                "training items (data_seed)"
                if self.test_seed == self.data_seed
                else "the validation split (data_seed + 1)"
            )
            raise ConfigError("test_seed", f"{self.test_seed} is the seed of {which}; the test split needs its own")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    warmup_ratio: float = 0.0  # fraction of the steps spent warming up linearly
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    max_grad_norm: float | None = 1.0  # null: no clipping

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        # torch.optim.AdamW's own rule (0 <= beta < 1), checked here so it fails before a run starts
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"betas[{i}]", f"must be in [0, 1), got {beta}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm", f"must be positive (null: no clipping), got {self.max_grad_norm}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: batch sizes, length, logging, checkpoints."""

    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # optimizer steps (PPO: rollout/update iterations)
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    save_every: int = 200  # steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in output_dir

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings (seeds 003, 004). Greedy when do_sample is false."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0, got {self.top_k}")


# The trackers `tracking.report_to` may name: accelerate's (accelerate.tracking.LOGGER_TYPE_TO_CLASS,
# tests/test_tracking.py keeps the two in step), each with the pip package that provides it; one
# that is not installed is dropped with a warning naming it (rlhf/tracking.py).
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow-skinny",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


@dataclass(frozen=True)
class TrackingConfig:
    """Where metrics go. metrics.jsonl in the output directory is always written."""

    report_to: tuple[str, ...] = ("tensorboard", "wandb")  # any of TRACKERS above, e.g. [mlflow]
    project: str = "rlhf"  # the project (wandb, comet_ml, swanlab, trackio, clearml), mlflow's experiment
    group: str | None = None  # wandb group (the pipeline sets it to the run name)
    run_name: str | None = None  # None: derived from the output directory
    # auto: online when wandb finds a key without asking (WANDB_API_KEY or the one `wandb login` stored)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    progress: bool = True  # progress bar with ETA on the console
    samples_every: int = 0  # steps between tables of sample generations (PPO); 0: with each evaluation

    def check(self) -> None:
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError("report_to", f"unknown tracker {name!r}; known: {', '.join(TRACKERS)}")


@dataclass(frozen=True)
class HubConfig:
    """Publishing the stage's output on the Hugging Face Hub when it finishes (rlhf/hub.py): the
    model directory with its model card (README.md), without the training checkpoints. TRL's
    `push_to_hub` and `hub_model_id`. Checked before anything loads: an unreachable hub (offline,
    HF_HUB_OFFLINE=1) or no login stops the run at once instead of after training."""

    push_to_hub: bool = False
    model_id: str | None = None  # the repository, "user/name" or "org/name"; created if missing
    private: bool = True  # a repository this creates is private unless set to false

    def check(self) -> None:
        if self.push_to_hub and not self.model_id:
            raise ConfigError("model_id", "must name the repository (e.g. me/my-model) when push_to_hub is true")
        if self.model_id is not None and (self.model_id.count("/") != 1 or " " in self.model_id):
            raise ConfigError("model_id", f"must look like 'user/name', got {self.model_id!r}")
