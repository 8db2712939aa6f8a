"""A stage keeps its saved model's held-out answers in the output directory; the next stage's "before"
(PPO's, DPO's of the SFT model) reads them instead of generating again, and anything that could change
an answer (the weights, the tokenizer, the generation settings, the prompts) makes it generate afresh."""

import json

import rlhf.evaluation as evaluation
from rlhf.checkpoint import model_files_digest
from rlhf.config import GenerationConfig, ModelInit
from rlhf.data import HeldOut
from rlhf.evaluation import evaluate_directory
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, load_tokenizer, resolve
from rlhf.tasks.subtraction import PROMPT

INIT = ModelInit()
GEN = GenerationConfig(max_new_tokens=4)


def examples(pairs):
    return [
        {
            "prompt": [{"role": "user", "content": PROMPT % (a, b)}],
            "completion": [{"role": "assistant", "content": str(a - b)}],
        }
        for a, b in pairs
    ]


HELD_OUT = HeldOut(
    validation=examples([(9, 4), (30, 31)]),
    test=examples([(52, 17), (3, 40), (7, 7)]),
    validation_source="-",
    test_source="-",
)


def save_policy(path, seed):
    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, INIT)
    build_policy(source, INIT, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)


def evaluate(path, gen=GEN, keep=False, held_out=HELD_OUT):
    return evaluate_directory(str(path), None, held_out, "subtraction", gen, INIT, resolve_precision(INIT), keep=keep)


def test_the_next_stage_reads_the_kept_answers_and_gets_the_same_report(tmp_path, monkeypatch):
    model = tmp_path / "sft"
    save_policy(model, seed=1)
    written = evaluate(model, keep=True)
    assert len(list((model / "evaluations").glob("answers-*.json"))) == 2  # test and validation
    # what a finished stage writes beside its model changes no answer
    (model / "eval.json").write_text("{}")
    (model / "README.md").write_text("# card")
    (model / "checkpoints").mkdir()
    (model / "checkpoints" / "state.bin").write_bytes(b"x")

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(evaluation, "generate_answers", refuse)
    assert evaluate(model) == written


def test_a_reader_keeps_nothing_in_a_directory_it_does_not_own(tmp_path):
    model = tmp_path / "policy"
    save_policy(model, seed=1)
    evaluate(model)
    assert not (model / "evaluations").exists()


def test_other_weights_settings_or_prompts_generate_afresh(tmp_path, monkeypatch):
    model = tmp_path / "sft"
    save_policy(model, seed=1)
    evaluate(model, keep=True)
    calls = []
    real = evaluation.generate_answers

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", counting)
    evaluate(model)
    assert calls == []
    evaluate(model, gen=GenerationConfig(max_new_tokens=5))  # another length: both splits again
    assert len(calls) == 2
    other = HeldOut(validation=HELD_OUT.validation, test=examples([(52, 17)]), validation_source="-", test_source="-")
    evaluate(model, held_out=other)  # other test prompts: that split again, validation kept
    assert len(calls) == 3
    digest = model_files_digest(model)
    save_policy(model, seed=2)  # re-trained in place: other weights
    assert model_files_digest(model) != digest
    evaluate(model)
    assert len(calls) == 5


def test_the_digest_of_an_adapter_follows_its_base_model(tmp_path):
    base = tmp_path / "base"
    save_policy(base, seed=1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    digest = model_files_digest(adapter)
    save_policy(base, seed=2)
    assert model_files_digest(adapter) != digest


def test_sampled_answers_are_never_kept(tmp_path):
    model = tmp_path / "sft"
    save_policy(model, seed=1)
    evaluate(model, gen=GenerationConfig(max_new_tokens=4, do_sample=True), keep=True)
    assert not (model / "evaluations").exists()
