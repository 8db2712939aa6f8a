"""The seams stage 3 grows on: rollout engines and advantage estimators are registries chosen by
config, an estimator without a critic means no value model anywhere, and a Rollout cannot be
built from positional tensors."""

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from test_ppo_stage import FAST, sft_dir  # noqa: F401  (the module-scoped policy fixture)

from conftest import ROOT
from rlhf.config import ConfigError, LoraConfig, ModelInit, PPOStageConfig, load_config
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.tracking import read_metrics
from stages.ppo import advantages, core_algos, engines
from stages.ppo import train as ppo_train
from stages.ppo.rollout import Rollout
from stages.ppo.run import LoopState
from stages.ppo.vllm_engine import policy_weights


def reward_to_go(rewards, values, mask, *, gamma, lam, group_size):
    """A critic-free estimator for the test: A_t = Σ_{k≥t} r_k (REINFORCE), no returns."""
    advantages_ = rewards.float().flip(1).cumsum(1).flip(1) * mask
    return advantages_, advantages_


def test_rollout_is_built_by_keyword_only():
    t = torch.zeros(2, 3)
    with pytest.raises(TypeError):
        Rollout(t, t, t, t, t, t, t, t, t, t[:, 0], t, t, t)  # eleven-plus positional tensors: refused
    r = Rollout(
        input_ids=t,
        attention_mask=t,
        response_ids=t,
        response_mask=t,
        loss_mask=t,
        logprobs=t + 1,
        ref_logprobs=t + 2,
        values=None,
        kl=t,
        scores=t[:, 0],
        rewards=t,
        advantages=t,
        returns=None,
    )
    picked = r.select(torch.tensor([1]))
    assert picked.logprobs.shape == (1, 3) and picked.values is None and picked.ref_logprobs[0, 0] == 2


def test_unknown_engine_estimator_or_policy_loss_is_refused_before_any_model_loads(tmp_path):
    for key in ("rollout.engine=nope", "ppo.advantage_estimator=nope", "ppo.policy_loss=nope"):
        with pytest.raises(ConfigError, match=key.split("=")[0]) as refused:  # engines are typed: refused on load
            cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [key, f"output_dir={tmp_path / 'x'}"])
            ppo_train.train(cfg)
        assert "\n" not in str(refused.value) and "nope" in str(refused.value)  # one line, naming the value
        assert not (tmp_path / "x").exists()


@pytest.fixture
def plugins():
    """An estimator and a policy loss registered the way outside code registers them (the decorators),
    removed afterwards so that the built-in registries stay as they were for the other tests."""
    spied = []

    def spy_loss(logprobs, old_logprobs, advantages_, mask, clip_range, **kwargs):
        spied.append(kwargs["agg"])
        zero = torch.zeros(())
        return (logprobs * 0).sum() + 7.0, {"clipfrac": zero, "approx_kl": zero, "ratio": zero + 1}

    advantages.register_estimator("reward_to_go", needs_critic=False)(reward_to_go)
    core_algos.register_policy_loss("spy")(spy_loss)
    yield spied
    advantages.ESTIMATORS.pop("reward_to_go")
    core_algos.POLICY_LOSSES.pop("spy")


def test_an_estimator_and_a_policy_loss_registered_from_outside_are_what_a_config_naming_them_gets(plugins):
    estimator = advantages.get_estimator("reward_to_go")
    assert estimator.fn is reward_to_go and not estimator.needs_critic and estimator.whiten
    with pytest.raises(ValueError, match="registered already"):  # a plug-in never replaces a built-in silently
        advantages.register_estimator("gae", needs_critic=False)(reward_to_go)
    with pytest.raises(ValueError, match="registered already"):
        core_algos.register_policy_loss("clip")(reward_to_go)
    assert advantages.get_estimator("gae").fn is advantages.gae_estimator

    # the loss step of a run configured with the registered loss calls it: a stand-in model, 2 episodes
    overrides = ["ppo.policy_loss=spy", "ppo.advantage_estimator=reward_to_go"]
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides)
    advantages.check_estimator(advantages.get_estimator(cfg.ppo.advantage_estimator), cfg)

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(5))

        def forward(self, input_ids, attention_mask, response_length):
            return self.logits.expand(input_ids.shape[0], response_length, 5), None  # (B, R, V), no critic

    t, ids = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long)
    ones = torch.ones(2, 3)
    mb = Rollout(
        input_ids=torch.ones(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5),
        response_ids=ids,
        response_mask=ones,
        loss_mask=ones,
        logprobs=t,
        ref_logprobs=t,
        values=None,
        kl=t,
        scores=t[:, 0],
        rewards=t,
        advantages=ones,
        returns=None,
    )
    loss, stats = ppo_train.minibatch_loss(StandIn(), mb, cfg)
    assert plugins == ["token_mean"] and loss.item() == pytest.approx(7.0) and stats["policy_loss"].item() == 7.0


@pytest.mark.slow
def test_an_estimator_without_a_critic_builds_no_value_model(sft_dir, tmp_path, monkeypatch, plugins):  # noqa: F811
    """An estimator registered from outside that needs no critic: no value model is built, trained or
    saved, and the policy still trains (its loss and KL are logged, no value terms)."""
    built = []
    real_build = ppo_train.build_models

    def build_models(*args, **kwargs):
        models = real_build(*args, **kwargs)
        unwrapped = models.model.module if hasattr(models.model, "module") else models.model
        built.append(unwrapped.value_model)
        built.append(len(models.optimizer.param_groups))
        return models

    monkeypatch.setattr(ppo_train, "build_models", build_models)
    out = tmp_path / "ppo"
    overrides = [
        f"policy={sft_dir}",
        "reward_model=null",
        "reward.sources.rm=null",
        "reward.sources.subtraction={kind: rule}",
    ]
    overrides += [*FAST, f"output_dir={out}", "train.max_steps=2", "train.save_every=0"]
    overrides += ["ppo.advantage_estimator=reward_to_go"]
    ppo_train.train(load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", overrides))

    assert built == [None, 1]  # no value model, one parameter group (the policy's)
    assert not (out / "value_model").exists() and not (out / "value_head.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/ppo/policy_loss" in r]
    assert len(rows) == 2 and all("train/ppo/value_loss" not in r for r in rows)


def test_engines_registry_holds_the_hf_sampler_and_vllm():
    assert engines.ENGINES["hf"] is engines.HFEngine
    assert set(engines.ENGINES) == {"hf", "vllm"}  # `auto` is not an engine: resolve_engine picks one of these


def test_weights_an_engine_receives_are_the_policys_with_the_adapter_merged():
    """What `update_weights` sends a vLLM engine (no vLLM needed to check): every parameter under
    its plain Hugging Face name (a tied head once), and with LoRA W + B·A·scale of the current
    adapter, equal to PEFT's own merge, the base weights untouched."""
    init = ModelInit(mixed_precision=None, dtype="float32")
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, init)
    accelerator = Accelerator(cpu=True)
    plain = build_policy(source, init, tokenizer, seed=0)
    sent = dict(policy_weights(plain, accelerator))
    assert sorted(sent) == sorted(n for n, _ in plain.named_parameters())
    assert all(torch.equal(sent[n], p) for n, p in plain.named_parameters())

    lora = build_policy(source, init, tokenizer, LoraConfig(enabled=True, r=4), seed=0, trained=True)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: make the adapter change something
    sent = dict(policy_weights(lora, accelerator))
    merged = dict(copy.deepcopy(lora).merge_and_unload().named_parameters())
    assert sorted(sent) == sorted(merged)
    assert all(torch.allclose(sent[n], merged[n], atol=1e-6) for n in sent)
    base = dict(plain.named_parameters())
    # 2 layers × the 7 LoRA targets of a Llama changed, nothing else; the adapter's own base weights untouched
    assert sum(not torch.equal(sent[n], base[n]) for n in sent) == 2 * 7
    assert torch.equal(
        lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
        base["model.layers.0.self_attn.q_proj.weight"],
    )


def test_logprobs_from_generation_refused_for_an_engine_of_its_own():
    """`rollout.engine: auto` may resolve to an engine with weights of its own only at run time: there too
    logprobs_from_generation=true is refused (π_old must be a trainer forward), and null picks the forward."""
    from types import SimpleNamespace

    from rlhf.precision import resolve_precision
    from stages.ppo.train import _logprobs_from_generation

    own = SimpleNamespace(own_weights=True)
    accelerator = SimpleNamespace(mixed_precision="no")
    for flag, expected in (("null", False), ("false", False)):
        cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", [f"rollout.logprobs_from_generation={flag}"])
        assert _logprobs_from_generation(cfg, resolve_precision(cfg.model_init), accelerator, own) is expected
    cfg = load_config(PPOStageConfig, ROOT / "configs/tiny/ppo.yaml", ["rollout.logprobs_from_generation=true"])
    with pytest.raises(ConfigError, match=r"rollout\.logprobs_from_generation"):
        _logprobs_from_generation(cfg, resolve_precision(cfg.model_init), accelerator, own)


def test_ppo_prompts_leave_room_for_a_response_within_data_max_length():
    # Unlimited, a long prompt ran past an absolute-position model's positions mid-run.
    from rlhf.data import DataError
    from stages.ppo.prompts import limit_prompts

    tiny = ROOT / "configs/tiny/ppo.yaml"
    base = ["data.max_length=10", "rollout.generation.max_new_tokens=4"]  # room for 6 prompt tokens
    prompts = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    ids = [[1] * 6, list(range(7)), [2] * 3]
    cfg = load_config(PPOStageConfig, tiny, base)
    assert limit_prompts(prompts, ids, cfg, "t", 10) == ([prompts[0], prompts[2]], [ids[0], ids[2]])
    cut = load_config(PPOStageConfig, tiny, [*base, "data.overlong=truncate"])
    assert limit_prompts(prompts, ids, cut, "t", 10) == (prompts, [ids[0], [1, 2, 3, 4, 5, 6], ids[2]])
    with pytest.raises(DataError, match="every prompt is longer"):
        limit_prompts(prompts[1:2], ids[1:2], cfg, "t", 10)
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        load_config(PPOStageConfig, tiny, ["data.max_length=8", "rollout.generation.max_new_tokens=8"])


def test_value_optim_max_grad_norm_that_deepspeed_would_ignore_is_refused(monkeypatch):
    # DeepSpeed clips the whole module's gradient norm to optim.max_grad_norm; value_optim's own
    # limit was silently dropped.
    from types import SimpleNamespace

    from stages.ppo import optim

    plugin = SimpleNamespace(deepspeed_config={})
    monkeypatch.setattr(optim, "deepspeed_plugin", lambda accelerator: plugin)
    accelerator = SimpleNamespace(num_processes=1)
    tiny = ROOT / "configs/tiny/ppo.yaml"
    differ = load_config(PPOStageConfig, tiny, ["optim.max_grad_norm=1.0", "value_optim.max_grad_norm=0.5"])
    with pytest.raises(ConfigError, match=r"value_optim\.max_grad_norm.*set both the same"):
        optim.fill_deepspeed_config(accelerator, differ, 16, has_value_model=True, model=torch.nn.Linear(2, 2))
    optim.fill_deepspeed_config(
        accelerator, differ, 16, has_value_model=False, model=torch.nn.Linear(2, 2)
    )  # no critic: nothing ignored
    same = load_config(PPOStageConfig, tiny, ["optim.max_grad_norm=0.5", "value_optim.max_grad_norm=0.5"])
    optim.fill_deepspeed_config(accelerator, same, 16, has_value_model=True, model=torch.nn.Linear(2, 2))
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5


def _blocks_model() -> torch.nn.Module:
    """An embedding of 10 × 4 = 40 parameters and two blocks of Linear(4, 8) (32 + 8 = 40) and
    Linear(8, 4) (32 + 4 = 36): 76 each."""
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.layers = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)) for _ in range(2)
    )
    return model


def test_zero3_sizes_come_from_the_largest_layer():
    from rlhf.distributed import fill_zero3_sizes, largest_layers, zero3_live_sizes

    assert largest_layers(_blocks_model()) == (76, 40)
    # two blocks live, the reuse distance one block
    assert zero3_live_sizes(76, 40) == {"stage3_max_live_parameters": 152, "stage3_max_reuse_distance": 76}
    # an embedding larger than a block (qwen2.5-0.5b: 136M against 15M) is gathered whole beside one
    assert zero3_live_sizes(15, 136)["stage3_max_live_parameters"] == 151
    assert zero3_live_sizes(0, 40) == {"stage3_max_live_parameters": 80, "stage3_max_reuse_distance": 40}
    # a 7B Llama decoder layer: 4·4096² + 3·4096·11008 = 202M, above the 1e8 the JSON held
    assert zero3_live_sizes(202_375_168, 131_072_000)["stage3_max_reuse_distance"] > 1e8
    for name in ("zero3.json", "zero3_offload.json"):
        ds = json.loads((ROOT / "configs/deepspeed" / name).read_text())
        fill_zero3_sizes(ds, _blocks_model())
        assert ds["zero_optimization"]["stage3_max_live_parameters"] == 152
        assert ds["zero_optimization"]["stage3_max_reuse_distance"] == 76
    kept = {"zero_optimization": {"stage3_max_live_parameters": 5, "stage3_max_reuse_distance": "auto"}}
    fill_zero3_sizes(kept, _blocks_model())
    assert kept["zero_optimization"] == {"stage3_max_live_parameters": 5, "stage3_max_reuse_distance": 76}


def test_offloaded_optimizer_is_deepspeeds_cpu_adam(monkeypatch):
    # DeepSpeed refuses torch's AdamW under optimizer offload (zero3_offload.json)
    from stages.ppo import optim

    configs = {
        name: json.loads((ROOT / "configs/deepspeed" / name).read_text())
        for name in ("zero3.json", "zero3_offload.json", "zero2.json")
    }
    assert optim.offloads_optimizer(configs["zero3_offload.json"])
    assert not optim.offloads_optimizer(configs["zero3.json"]) and not optim.offloads_optimizer(configs["zero2.json"])
    assert not optim.offloads_optimizer(None)
    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}]  # noqa: E731
    assert isinstance(optim.build_optimizer(groups(), 0.1, configs["zero3.json"]), torch.optim.AdamW)
    adam = pytest.importorskip("deepspeed.ops.adam")  # constructing the real one compiles a C++ op: not here
    built = []
    monkeypatch.setattr(adam, "DeepSpeedCPUAdam", lambda groups, **kw: built.append(kw) or "cpu-adam")
    assert optim.build_optimizer(groups(), 0.1, configs["zero3_offload.json"]) == "cpu-adam"
    assert built == [{"lr": 0.1, "adamw_mode": True}]


def test_loop_state_checkpoints_as_the_dict_it_replaced_and_resumes_from_one():
    """ppo_state.json's "state" keeps the keys the untyped dict had: a checkpoint written before
    LoopState resumes, and `best` / `reward_fingerprint` appear only once set."""
    fresh = LoopState()
    assert fresh.to_dict() == {"step": 0, "before": None, "kl_history": []}
    old = {"step": 7, "before": {"accuracy": 0.5}, "kl_history": [0.1, 0.2], "best": {"by": "gold", "step": 5}}
    state = LoopState.from_dict(json.loads(json.dumps(old)))
    assert (state.step, state.kl_history, state.best["step"], state.reward_fingerprint) == (7, [0.1, 0.2], 5, None)
    assert state.to_dict() == old
    state.reward_fingerprint = "abc"
    assert LoopState.from_dict(state.to_dict()) == state
