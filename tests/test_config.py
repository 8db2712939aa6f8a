"""Configs: every YAML in configs/ loads into its dataclass; overrides, unknown keys and wrong
types behave as documented."""

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, SFTStageConfig, config_hash, dump_yaml, load_config
from rlhf.config.stages import (
    NOT_HASHED,
    CPOStageConfig,
    DPOStageConfig,
    KTOStageConfig,
    LabelStageConfig,
    ORPOStageConfig,
    PPOStageConfig,
    RMStageConfig,
)

ROOT = Path(__file__).resolve().parents[1]
STAGE_CLASSES = {
    "sft.yaml": SFTStageConfig,
    "rm.yaml": RMStageConfig,
    "ppo.yaml": PPOStageConfig,
    "dpo.yaml": DPOStageConfig,
    "label.yaml": LabelStageConfig,
}
STAGE_CLASSES |= {"grpo.yaml": PPOStageConfig, "rloo.yaml": PPOStageConfig}  # stage 3 with other estimators
STAGE_CLASSES |= {"ppo_rule.yaml": PPOStageConfig}  # stage 3 with the checker as the reward
STAGE_CLASSES |= {"ppo_implicit.yaml": PPOStageConfig}  # stage 3 with a DPO model's implicit reward
# stage 3 by the other preference methods (docs/preference-methods.md)
STAGE_CLASSES |= {"kto.yaml": KTOStageConfig, "orpo.yaml": ORPOStageConfig, "simpo.yaml": CPOStageConfig}


def stage_class(path: Path):
    # pipeline.yaml, pipeline_dpo.yaml, and a pipeline named for its experiment (smollm2-135m/constraints.yaml)
    if path.name.startswith("pipeline") or "\nstages:" in path.read_text(encoding="utf-8"):
        from rlhf.pipeline import PipelineConfig

        return PipelineConfig
    return STAGE_CLASSES[path.name]


def our_yamls():
    """Every stage and pipeline config; not accelerate's, nor the `_*.yaml` fragments that only
    other configs name in `base:` (test_every_fragment_is_a_base)."""
    return sorted(
        p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts and not p.name.startswith("_")
    )


@pytest.mark.parametrize("path", our_yamls(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads(path):
    load_config(stage_class(path), path)
    # and documents its launch command in its header
    assert path.read_text(encoding="utf-8").startswith("#")
    assert "launch" in path.read_text(encoding="utf-8").split("\n\n")[0]


def test_overrides_nested_and_typed(tmp_path):
    cfg = load_config(
        SFTStageConfig,
        ROOT / "configs/tiny/sft.yaml",
        [
            "train.max_steps=7",
            "optim.lr=1e-3",
            "model=tiny-gpt2",
            "task.eval_digits=[2, 5, 10]",
            "data.train=x.jsonl",
            "seed=3",
            "output_dir=runs/a/sft",
            "lora.enabled=true",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.model == "tiny-gpt2"
    assert cfg.task.eval_digits == (2, 5, 10) and cfg.data.train == "x.jsonl" and cfg.seed == 3
    assert cfg.lora.enabled is True
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 4  # the loaded config is never mutated


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.max_step=3", "train.max_step", "did you mean 'train.max_steps'"),
        ("trian.max_steps=3", "trian", "unknown key"),
        ("train.max_steps=abc", "train.max_steps", "expected an integer"),
        ("optim.lr=fast", "optim.lr", "expected a number"),
        ("lora.enabled=maybe", "lora.enabled", "expected true or false"),
        ("data.overlong=cut", "data.overlong", "must be one of"),
        ("optim.lr=-1", "optim.lr", "must be positive"),
        ("train.max_steps.x=1", "train.max_steps", "is a value, not a section"),
        ("task.eval_digits=5", "task.eval_digits", "expected a list"),
        ("optim.lr=nan", "optim.lr", "must be a finite number"),
        ("optim.lr=.inf", "optim.lr", "must be a finite number"),
        ("optim.betas=[0.9]", "optim.betas", "expected a list of 2 values"),
        ("optim.betas=[0.9, 0.99, 0.999]", "optim.betas", "expected a list of 2 values"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1]", "must be in [0, 1)"),
        ("optim.betas=[.nan, 0.9]", "optim.betas[0]", "must be a finite number"),
        ("task.train_weights=[1, .nan, 1, 1]", "task.train_weights[1]", "must be a finite number"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, ROOT / "configs/tiny/sft.yaml", [override])
    assert err.value.key == key and words in str(err.value)


def test_shared_trunk_refuses_a_value_model():
    from rlhf.config import PPOStageConfig

    with pytest.raises(ConfigError) as err:
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["share_policy_trunk=true", "value_model=runs/x"])
    assert err.value.key == "value_model" and "share_policy_trunk" in str(err.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ntrain:\n  batchsize: 4\n")
    with pytest.raises(
        ConfigError, match=rf"{path}: config key 'train.batchsize': unknown key; did you mean 'train.batch_size'"
    ):
        load_config(SFTStageConfig, path)


def test_resolved_config_round_trips_and_hash_ignores_paths(tmp_path):
    cfg = load_config(SFTStageConfig, ROOT / "configs/tiny/sft.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(SFTStageConfig, path) == cfg
    moved = load_config(SFTStageConfig, path, ["output_dir=elsewhere", "tracking.report_to=[]"])
    changed = load_config(SFTStageConfig, path, ["train.max_steps=1"])
    assert config_hash(moved, NOT_HASHED) == config_hash(cfg, NOT_HASHED) != config_hash(changed, NOT_HASHED)
    assert yaml.safe_load(path.read_text())["train"]["max_steps"] == cfg.train.max_steps


def test_rm_kind_weights_default_to_one_and_name_unknown_kinds():
    from rlhf.config import RMStageConfig

    cfg = load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", ["pairs.kinds=[sign_error, wrong_digit]"])
    assert cfg.pairs.kind_weights() == [1.0, 2.0]  # rm.yaml weighs wrong_digit 2
    with pytest.raises(ConfigError, match=r"'pairs\.train_kind_weights': unknown kind 'wrongdigit'"):
        load_config(RMStageConfig, ROOT / "configs/tiny/rm.yaml", ["pairs.train_kind_weights={wrongdigit: 2}"])


def _float_keys(cls, prefix=""):
    """Every float-typed field of a config tree, as dotted keys with a sample override value."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | None)) else (tp,)
        if float in arms:
            yield key
        elif dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, f"{key}.")


@pytest.mark.parametrize("cls, path", [(c, ROOT / "configs/tiny" / n) for n, c in STAGE_CLASSES.items()])
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_no_float_field_takes_nan_or_inf(cls, path, bad):
    # A NaN passes every range check (all comparisons are false) and trains without an error.
    keys = list(_float_keys(cls))
    assert "generation.temperature" in keys if cls is LabelStageConfig else "optim.lr" in keys and len(keys) > 5
    for key in keys:
        with pytest.raises(ConfigError) as err:
            load_config(cls, path, [f"{key}={bad}"])
        assert err.value.key == key and "finite" in str(err.value), key
    with pytest.raises(ConfigError, match="finite"):  # dict values too
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [f"reward.sources.rm.weight={bad}"])


def test_nan_in_a_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .NaN\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'optim.lr': must be a finite number"):
        load_config(SFTStageConfig, path)


def test_a_yaml_comment_in_an_override_is_refused_and_quoting_keeps_it():
    # `tracking.run_name=my run #3` used to load as "my run": YAML dropped ' #3' as a comment.
    with pytest.raises(ConfigError) as err:
        load_config(SFTStageConfig, None, ["tracking.run_name=my run #3"])
    assert err.value.key == "tracking.run_name" and "quote it" in str(err.value)
    assert load_config(SFTStageConfig, None, ['tracking.run_name="my run #3"']).tracking.run_name == "my run #3"
    assert load_config(SFTStageConfig, None, ["tracking.run_name=a#3"]).tracking.run_name == "a#3"


@pytest.mark.parametrize("value", ["runs/exp #2/sft", "a: b", "!tag", "null", "123", " x ", 'é😀"\\\t\n', ""])
def test_format_override_reads_back_exactly(value):
    from rlhf.config.schema import format_override, parse_override

    assert parse_override(format_override("output_dir", value)) == ("output_dir", value)


@pytest.mark.parametrize("kl", [["ppo.kl_in=reward"], ["ppo.kl_in=loss", "ppo.kl_estimator=k3"], ["ppo.kl_coef=0"]])
def test_grpo_refuses_the_kl_in_the_reward(kl):
    """GRPO divides each group's rewards by their std: with the KL in the reward, a group of equal scores
    [1, 1, 1, 1] and KL sums [0.5, 1, 1.5, 2] gets advantages ±1.16 and ±0.39 from KL noise alone, whatever β is
    (DeepSeekMath §4.1 puts the KL in the loss). Refused at load; the loss, or β = 0, is accepted."""
    from rlhf.config import PPOStageConfig

    overrides = ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=reward", *kl]
    if kl == ["ppo.kl_in=reward"]:
        with pytest.raises(ConfigError) as err:
            load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)
        assert err.value.key == "ppo.kl_in" and "grpo" in str(err.value) and "\n" not in str(err.value)
    else:
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)
    for other in ("dr_grpo", "rloo", "reinforce_pp_baseline"):  # a baseline subtracted: β keeps its meaning
        load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [*overrides, f"ppo.advantage_estimator={other}"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.importance_correction=tis"], "rollout.importance_correction"),
        (["rollout.engine=vllm"], "rollout.logprobs_from_generation"),
    ],
)
def test_logprobs_from_generation_refused_where_pi_old_would_not_be_a_trainer_forward(overrides, key):
    """With π_old taken from the sampling pass, TIS's weight min(π_old / π_engine, C) is 1 everywhere and
    rollout/logprob_diff_* reads 0; with an engine of its own (vLLM) π_old would be another kernel's. Both
    are refused at load (docs/ppo.md: π_old comes from a trainer forward); without the flag both load."""
    from rlhf.config import PPOStageConfig

    with pytest.raises(ConfigError) as err:
        load_config(
            PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["rollout.logprobs_from_generation=true", *overrides]
        )
    assert err.value.key == key and "\n" not in str(err.value)
    load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["rollout.logprobs_from_generation=null", *overrides])


def test_a_key_given_twice_in_yaml_is_refused(tmp_path):
    # The JSON loader refuses duplicate keys; PyYAML kept the last one without a word.
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ntrain:\n  max_steps: 4\n  max_steps: 8\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'max_steps'.*line 4"):
        load_config(SFTStageConfig, path)


def test_an_alias_in_yaml_is_refused(tmp_path):
    # An alias is one shared object: `optim.lr=...` would have changed the aliased section too.
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ngeneration: &gen {max_new_tokens: 8}\ngeneration_base: *gen\n")
    with pytest.raises(ConfigError, match=r"alias \*gen refused"):
        load_config(SFTStageConfig, path)


@pytest.mark.parametrize("text", ["1.10", "0755", "1e3", "12:30"])
def test_a_string_field_keeps_a_number_as_written(tmp_path, text):
    # YAML 1.1 read these as 1.1, 493, 1000.0 and 750: `name=1.10` wrote to runs/1.1.
    assert load_config(SFTStageConfig, None, [f"output_dir={text}"]).output_dir == text
    path = tmp_path / "c.yaml"
    path.write_text(f"model: tiny\noutput_dir: {text}\n")
    assert load_config(SFTStageConfig, path).output_dir == text


@pytest.mark.parametrize("text", ["0755", "1:30"])
def test_an_integer_field_refuses_yaml_1_1_octal_and_base_60(text):
    with pytest.raises(ConfigError, match=rf"train.max_steps': write '{text}' in decimal"):
        load_config(SFTStageConfig, None, [f"train.max_steps={text}"])
    assert load_config(SFTStageConfig, None, ["train.max_steps=755"]).train.max_steps == 755
