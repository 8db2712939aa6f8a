"""Build the models of every stage from a name: a preset, a local directory or a hub id.

- `resolve(name)` says where weights come from (and reads an earlier stage's manifest);
- `load_tokenizer` sets up pad token, padding side and chat template;
- every model built carries its stop tokens (EOS and the template's end of turn, rlhf/registry/turns.py)
  in `generation_config.eos_token_id`;
- `build_policy` gives a causal LM, `build_scalar_model` the same decoder with a one-output head
  (the reward model reads it at the last real token, the value model at every token);
- LoRA (PEFT) wraps either; QLoRA loads the base in 4 bits where bitsandbytes and a GPU exist.

Weights' dtype and the attention kernel come from the stage's `Precision` (rlhf/precision.py): a
model built with `trained=True` holds what trains (the whole model, or LoRA adapters and PEFT's
`modules_to_save` heads) in `precision.trained_dtype`, fp32 without DeepSpeed; the rest in `dtype`.

Works for any decoder transformers has `AutoModelForCausalLM` / `AutoModelForSequenceClassification`
classes for; tests cover Llama, Qwen2, Mistral and GPT-2 shapes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.checkpoint import read_manifest
from rlhf.config import LoraConfig, ModelInit
from rlhf.config.parts import chat_template_text
from rlhf.distributed import whole_models
from rlhf.precision import Precision, resolve_precision
from rlhf.registry.errors import ModelLoadError
from rlhf.registry.gguf import GGUF_PREFIX, converted_dir, gguf_path, hub_snapshot
from rlhf.registry.presets import PRESETS, Preset
from rlhf.registry.tiny import build_tiny_tokenizer
from rlhf.registry.turns import stop_token_ids

# For base models that ship no chat template. `{% generation %}` marks assistant tokens (TRL's
# assistant-only loss); the prompt rendered alone is a prefix of prompt + answer.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}{{ ': ' + message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


@dataclass(frozen=True)
class ModelSource:
    """Where a model named in a config comes from."""

    name: str  # as written in the config
    path: str | None  # directory or hub id holding weights; None for a built-in preset
    preset: Preset | None  # the named preset, or the one the earlier stages started from
    adapter: str | None = None  # a PEFT adapter directory applied on top of `path`
    adapter_task: str | None = None  # "CAUSAL_LM" or "SEQ_CLS"
    manifest: dict | None = None  # an earlier stage's manifest.json

    @property
    def lora_targets(self) -> tuple[str, ...] | str:
        return self.preset.lora_targets if self.preset else "all-linear"

    @property
    def root(self) -> str:
        """The base model the whole chain of stages started from (preset name or hub id)."""
        if self.manifest and self.manifest.get("base_model"):
            return self.manifest["base_model"]
        return self.name


def resolve(name: str) -> ModelSource:
    """A preset name, a local model directory (an earlier stage's output or any HF model
    directory, LoRA adapters included), a GGUF file (`<path>.gguf` or `gguf:<path>`, converted
    once into a model directory) or a hub id."""
    if name in PRESETS:
        return ModelSource(name, _preset_path(PRESETS[name]), PRESETS[name])
    path = Path(name).expanduser()
    if name.startswith(GGUF_PREFIX) or (path.suffix == ".gguf" and path.is_file()):
        return ModelSource(name, str(converted_dir(gguf_path(name))), None)
    if path.is_dir():
        manifest = read_manifest(path)
        preset = PRESETS.get((manifest or {}).get("base_model", ""))
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.is_file() and (path / "merged" / "config.json").is_file():
            # the stage also saved its adapter merged (lora.merge_on_save): a plain model directory,
            # which loads as any other (under ZeRO-3 straight into shards; no merge on each process)
            return ModelSource(name, str(path / "merged"), preset, manifest=manifest)
        if adapter_cfg.is_file():
            info = json.loads(adapter_cfg.read_text())
            base_dir = path / "base_model"  # written where no disk held the base (rlhf/hf_trainer.py save_output)
            base = str(base_dir) if base_dir.is_dir() else info.get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{path}: adapter_config.json names no base model")
            if preset is not None and preset.gguf is not None and not Path(base).is_dir():
                # the base was a GGUF's converted directory, since cleared from the cache: convert again
                base = manifest["base_model"]
            inner = resolve(base)
            return ModelSource(name, inner.path, preset or inner.preset, str(path), info.get("task_type"), manifest)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but holds no config.json: not a model directory")
        return ModelSource(name, str(path), preset, manifest=manifest)
    if path.exists():
        raise ModelLoadError(f"{name} is a file; expected a model directory, a preset or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model directory {name} does not exist (has the earlier stage run?)")
    return ModelSource(name, name, None)  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


def _preset_path(preset: Preset) -> str | None:
    """A hub preset's hub id; one that ships a GGUF: the HF cache's copy if there is one, else the
    GGUF converted into a model directory. Never downloads."""
    if preset.gguf is None:
        return preset.hub_id
    return hub_snapshot(preset.hub_id) or str(converted_dir(preset.gguf.path()))


def load_tokenizer(source: ModelSource, init: ModelInit) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token distinct from EOS, right padding and a chat template."""
    if source.adapter and (Path(source.adapter) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(source.adapter)
    elif source.path is None:
        tokenizer = build_tiny_tokenizer()
    else:
        with _load_errors(source):
            tokenizer = AutoTokenizer.from_pretrained(
                source.path, revision=init.revision, trust_remote_code=init.trust_remote_code
            )
    if init.chat_template is not None:  # the user's, over the model's (none, or a wrong one)
        tokenizer.chat_template = chat_template_text(init.chat_template)
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token is None:
        raise ModelLoadError("the tokenizer has no EOS token; generation could never stop")
    # A pad distinct from EOS: sequence-classification heads find the last real token by looking
    # for pad ids, and a pad equal to EOS would make them read the token before a final EOS.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        choice = next((t for t in _PAD_CANDIDATES if t in vocab and t != tokenizer.eos_token), None)
        if choice is not None:
            tokenizer.pad_token = choice
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_policy(
    source: ModelSource,
    init: ModelInit,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoraConfig | None = None,
    seed: int = 0,
    precision: Precision | None = None,
    trained: bool = False,
    reference: bool = False,
) -> PreTrainedModel:
    """A causal LM (an adapter from an earlier stage is merged in), optionally LoRA-wrapped.
    `precision`: the stage's resolved one; None resolves it from `init` (tests, tools).
    `trained`: the stage trains this model (its trainable parameters get `precision.trained_dtype`).
    `reference`: a frozen copy of a policy the stage trains in full (PPO's and DPO's reference),
    loaded in the trained dtype too, so that before any update it computes exactly as the policy:
    bf16 weights beside the policy's fp32 ones under bf16 autocast differ in every embedding and
    norm (rollout KL 1.5e-3 at step 0 on the tiny model)."""
    precision = precision or resolve_precision(init)
    dtype = _load_dtype(precision, lora, trained or reference)
    with _whole_to_merge(source):
        model = _load(AutoModelForCausalLM, source, init, precision, seed, dtype)
        if source.adapter:
            model = _merge_adapter(model, source.adapter)
    _fit_vocab(model, tokenizer)
    return _finish(model, init, lora, source, "CAUSAL_LM", precision.trained_dtype if trained else None)


def build_scalar_model(
    source: ModelSource,
    init: ModelInit,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoraConfig | None = None,
    seed: int = 0,
    precision: Precision | None = None,
    trained: bool = False,
) -> PreTrainedModel:
    """The decoder with a one-output linear head (`score`): a reward model, or a value model read
    at every token. From a causal LM the head starts random; from a reward model it is kept.
    `precision`: the stage's resolved one; None resolves it from `init` (tests, tools).
    `trained`: the stage trains this model (its trainable parameters get `precision.trained_dtype`)."""
    precision = precision or resolve_precision(init)
    dtype = _load_dtype(precision, lora, trained)
    with _whole_to_merge(source):
        if source.adapter and source.adapter_task != "SEQ_CLS":
            # LoRA SFT output: merge the adapter into the causal LM, then move its body under a head.
            lm = _merge_adapter(_load(AutoModelForCausalLM, source, init, precision, seed, dtype), source.adapter)
            model = _load(AutoModelForSequenceClassification, source, init, precision, seed, dtype, num_labels=1)
            _backbone(model).load_state_dict(_backbone(lm).state_dict())
            del lm
        else:
            model = _load(AutoModelForSequenceClassification, source, init, precision, seed, dtype, num_labels=1)
            if source.adapter:
                model = _merge_adapter(model, source.adapter)
    model.config.pad_token_id = tokenizer.pad_token_id
    _fit_vocab(model, tokenizer)
    return _finish(model, init, lora, source, "SEQ_CLS", precision.trained_dtype if trained else None)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a model built by `build_scalar_model` (PEFT-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ModelLoadError(f"{type(inner).__name__} has no `score` head")
    return head


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder body (no head) of a causal-LM or scalar-head model, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _backbone(inner)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, as `generate` uses: a left-padded row gets the same
    positions as the unpadded one. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(
    policy: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    hidden_states: bool = False,
):
    """One forward of the policy over left-padded prompt + response, with generate's positions;
    the LM head runs on the last `logits_to_keep` positions only, which at real vocabulary sizes
    saves most of the forward's memory."""
    return policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=logits_to_keep,
        output_hidden_states=hidden_states,
    )


def policy_logits(
    policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
) -> torch.Tensor:
    """Logits (B, R, V) at the positions that predict the last `response_len` tokens."""
    return policy_forward(policy, input_ids, attention_mask, response_len + 1).logits[:, :-1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every token, in fp32: the value model's V(s_t). (B, T) -> (B, T).

    Under DDP or DeepSpeed call this inside the wrapped module's forward (see stages/ppo/models.py),
    never on the wrapped model's children from outside, or gradients would not be synchronised."""
    hidden = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    return score_head(model)(hidden).squeeze(-1).float()  # (B, T)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's score, read at the last real token of each row whatever the padding
    side (never at a pad). (B, T) -> (B,)."""
    scores = token_scores(model, input_ids, attention_mask)  # (B, T)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def _backbone(model: PreTrainedModel) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def _load_dtype(precision: Precision, lora: LoraConfig | None, trained: bool) -> torch.dtype:
    """The dtype to load weights in: a model trained in full is all trainable parameters; with LoRA
    the base is frozen and only what PEFT adds is cast to the trained dtype (`_finish`)."""
    return precision.trained_dtype if trained and not (lora and lora.enabled) else precision.dtype


def _load(
    auto_cls, source: ModelSource, init: ModelInit, precision: Precision, seed: int, dtype: torch.dtype, **kwargs
) -> PreTrainedModel:
    attn = precision.attn_implementation
    if source.path is None:  # built-in preset: random init from its config, reproducible by seed
        config = source.preset.make_config()
        for k, v in kwargs.items():
            setattr(config, k, v)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return auto_cls.from_config(config, dtype=dtype, **({"attn_implementation": attn} if attn else {}))
    options = dict(
        revision=init.revision,
        trust_remote_code=init.trust_remote_code,
        dtype=dtype,
        **kwargs,
    )
    if attn:
        options["attn_implementation"] = attn
    if init.load_in_4bit:
        options["quantization_config"] = _four_bit_config()
    with _load_errors(source), _quiet_head_warnings():
        return auto_cls.from_pretrained(source.path, **options)


def _whole_to_merge(source: ModelSource):
    """Where an earlier stage's adapter is merged in, the model is built whole on this process:
    under ZeRO-3 transformers would otherwise build it partitioned across processes, and the merge
    would meet empty shards. DeepSpeed partitions the merged model when the stage prepares it."""
    return whole_models() if source.adapter else contextlib.nullcontext()


def _merge_adapter(model: PreTrainedModel, adapter_dir: str) -> PreTrainedModel:
    from peft import PeftModel

    return merge_lora(PeftModel.from_pretrained(model, adapter_dir), model.dtype)


def merge_lora(model, dtype: torch.dtype | None = None):
    """A PEFT model's adapters merged into its weights, W + B·A·scaling summed in fp32, then cast
    to `dtype` (None: kept in fp32, so the merged model is the one trained). Summed in bf16 a delta
    under half an ulp is lost: bf16(1.0 + 0.003) = 1.0. A quantised base is merged as PEFT does
    (it dequantises)."""
    if getattr(model.get_base_model(), "hf_quantizer", None) is None:
        model = model.float()
    merged = model.merge_and_unload()
    return merged if dtype is None else merged.to(dtype)


def _finish(
    model,
    init: ModelInit,
    lora: LoraConfig | None,
    source: ModelSource,
    task_type: str,
    trained_dtype: torch.dtype | None,
):
    if init.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if init.load_in_4bit and not (lora and lora.enabled):
        raise ModelLoadError("model_init.load_in_4bit (QLoRA) needs lora.enabled=true: 4-bit weights cannot be trained")
    if lora is None or not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if init.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=init.gradient_checkpointing)
    targets = lora.target_modules or source.lora_targets
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        task_type=task_type,
    )
    model = get_peft_model(model, peft_config)
    if trained_dtype is not None:
        cast_trainable(model, trained_dtype)
    return model


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that train to `dtype` (the stage's `precision.trained_dtype`). PEFT
    upcasts LoRA adapters to fp32 itself (`autocast_adapter_dtype`) but copies `modules_to_save`
    heads (a reward or value model's `score`) in the base's dtype; under DeepSpeed this brings the
    adapters back to the base's dtype, as ZeRO-3 needs one dtype (trl#6089) and keeps fp32 masters."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _fit_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer gained tokens (e.g. an added pad token)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # every token that ends a turn, the model's own list included (rlhf/registry/turns.py): what
        # sampling stops at here, and what a saved model's generation_config.json tells a user's generate()
        model.generation_config.eos_token_id = list(stop_token_ids(tokenizer, model.generation_config))


def _four_bit_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("model_init.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    if not torch.cuda.is_available():
        raise ModelLoadError("model_init.load_in_4bit needs a CUDA GPU; on CPU use lora.enabled=true alone")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@contextlib.contextmanager
def _load_errors(source: ModelSource):
    try:
        yield
    except (OSError, ValueError) as e:
        presets = ", ".join(sorted(PRESETS))
        raise ModelLoadError(
            f"cannot load model '{source.name}': not a preset ({presets}), not a local model directory, "
            f"and loading '{source.path}' from the hub failed (offline? HF_HUB_OFFLINE={_offline()}): {e}"
        ) from None


def _offline() -> str:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0")


@contextlib.contextmanager
def _quiet_head_warnings():
    """Loading a causal LM into a scalar-head class drops lm_head and starts `score` at random:
    expected here, so the loader's warnings about it are silenced."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def config_of(source: ModelSource, init: ModelInit):
    """The model config without loading weights."""
    if source.path is None:
        return source.preset.make_config()
    with _load_errors(source):
        return AutoConfig.from_pretrained(source.path, revision=init.revision, trust_remote_code=init.trust_remote_code)


@torch.no_grad()
def fingerprint(module: torch.nn.Module, frozen_only: bool = False) -> str:
    """A checksum of a module's weights (frozen ones only, if asked: with LoRA the reference is
    the policy's non-adapter weights), to prove the reference never moved, or which weights a
    stage started from."""
    total = torch.zeros(2, dtype=torch.float64)
    for _name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if frozen_only and p.requires_grad:
            continue
        data = p.detach().double().cpu()
        total += torch.stack([data.abs().sum(), (data * data).sum()])
    return f"{total[0].item():.10e}/{total[1].item():.10e}"
