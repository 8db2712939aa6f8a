"""Generation decodes exactly as our GenerationConfig says, whatever decoding defaults the model's
own generation_config.json carries (hub models ship repetition penalties, top-k, top-p), and stops
at the chat template's end of turn as well as at EOS."""

import pytest
import torch
from scripted_model import END_OF_TURN, bigram_policy, tokenizer_with_end_of_turn

from rlhf.config import GenerationConfig, ModelInit
from rlhf.evaluation import response_rows
from rlhf.generation import ended_at, generate_ids, generate_text, left_pad, render_prompts
from rlhf.registry import build_policy, last_token_index, load_tokenizer, resolve, stop_token_ids

INIT = ModelInit()
PROMPTS = [
    [{"role": "user", "content": "请计算：12 - 3 = ，直接返回计算结果"}],
    [{"role": "user", "content": "请计算：1 - 2 = "}],
]


def polluted_policy():
    """A tiny policy whose generation_config asks for everything a hub model might."""
    source = resolve("tiny")
    tokenizer = load_tokenizer(source, INIT)
    policy = build_policy(source, INIT, tokenizer, seed=0).eval()
    g = policy.generation_config
    g.do_sample, g.temperature, g.top_k, g.top_p = True, 0.3, 1, 0.5
    g.repetition_penalty, g.no_repeat_ngram_size, g.min_new_tokens = 3.0, 1, 6
    g.suppress_tokens = tokenizer.convert_tokens_to_ids(list("0123456789"))
    return policy, tokenizer


@torch.no_grad()
def manual_greedy(policy, tokenizer, prompt_ids, steps):
    """Argmax of full forwards, token by token, no processors at all."""
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    out = []
    for _ in range(steps):
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(out, 1)


def test_greedy_ignores_the_models_own_decoding_defaults():
    policy, tokenizer = polluted_policy()
    rows = render_prompts(tokenizer, PROMPTS)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False)
    _, response, _ = generate_ids(policy, tokenizer, rows, gen)
    expected = manual_greedy(policy, tokenizer, rows, response.shape[1])
    # up to the first EOS (after it generate pads), the tokens are the plain argmax
    for got, want in zip(response.tolist(), expected.tolist(), strict=True):
        n = got.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in got else len(got)
        assert got[:n] == want[:n]


def test_sampling_is_not_truncated_by_the_models_top_k():
    policy, tokenizer = polluted_policy()  # its own config says top_k=1: every sample would be the argmax
    rows = render_prompts(tokenizer, PROMPTS[:1]) * 16
    torch.manual_seed(0)
    _, response, _ = generate_ids(policy, tokenizer, rows, GenerationConfig(max_new_tokens=4, do_sample=True))
    assert len({tuple(r) for r in response.tolist()}) > 8  # an untrained 576-token model: samples differ


def test_sampled_logprobs_equal_a_forward_of_the_policy():
    """PPO may take its rollout log-probs from the sampling pass: they must be the log-probs a
    forward of the policy over prompt + response gives, of logits / T over the whole vocabulary
    (top-k only narrows what is drawn)."""
    from stages.ppo.core_algos import logprobs_from_logits
    from stages.ppo.models import policy_logits
    from stages.ppo.rollout import response_mask

    source = resolve("tiny")
    tokenizer = load_tokenizer(source, INIT)
    policy = build_policy(source, INIT, tokenizer, seed=0).eval()
    rows = render_prompts(tokenizer, PROMPTS) * 4
    torch.manual_seed(0)
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20)
    query, response, logprobs = generate_ids(policy, tokenizer, rows, gen, with_logprobs=True)
    mask = response_mask(ended_at(response, stop_token_ids(tokenizer, policy.generation_config))[1], response.shape[1])
    input_ids = torch.cat([query, response], 1)
    attention_mask = torch.cat([(query != tokenizer.pad_token_id).long(), mask], 1)
    with torch.no_grad():
        expected = logprobs_from_logits(
            policy_logits(policy, input_ids, attention_mask, response.shape[1]) / 0.7, response
        )
    real = mask.bool()
    assert real.sum() >= 16
    torch.testing.assert_close(logprobs[real], expected[real], atol=1e-5, rtol=0)


def test_generation_stops_at_the_templates_end_of_turn():
    """Issue 14 item 10: a template whose turns end in <end_of_turn> (Gemma's shape; EOS is another
    token) stops there: in evaluation's text, in PPO's rollout (the mask, the missing-EOS flag, the
    token the reward model is read at) and in the rows the reward model is trained and scored on.
    Before, generation ran on past it to max_new_tokens: "42" came back as "429999"."""
    from stages.ppo.engines import Generated
    from stages.ppo.sampling import episode_tensors

    tokenizer = tokenizer_with_end_of_turn()
    # after the assistant marker: 4, 2, <end_of_turn>, then 9s for ever if not stopped
    policy = bigram_policy(tokenizer, {"<|assistant|>": "4", "4": "2", "2": END_OF_TURN, END_OF_TURN: "9", "9": "9"})
    four, two, eot = tokenizer.convert_tokens_to_ids(["4", "2", END_OF_TURN])
    stops = stop_token_ids(tokenizer, policy.generation_config)
    assert stops == (eot, tokenizer.eos_token_id) and eot != tokenizer.eos_token_id
    gen = GenerationConfig(max_new_tokens=6, do_sample=False)

    assert generate_text(policy, tokenizer, PROMPTS, gen) == ["42", "42"]

    query, response, _ = generate_ids(policy, tokenizer, render_prompts(tokenizer, PROMPTS), gen)
    assert response.tolist() == [[four, two, eot]] * 2  # stopped: nothing generated after it
    ended, lengths = ended_at(response, stops)  # as the hf engine reports them
    sampled = Generated(prompt_ids=query, response_ids=response, logprobs=None, lengths=lengths, ended=ended)
    input_ids, attention_mask, resp_mask, has_eos = episode_tensors(sampled, tokenizer)
    assert has_eos.tolist() == [True, True]  # no missing-EOS penalty
    assert resp_mask.tolist() == [[1, 1, 1]] * 2
    read_at = input_ids.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    assert read_at.tolist() == [eot, eot]  # the reward model's score is read at the end of turn

    # the reward model is trained and scored on the same ending
    assert response_rows(tokenizer, PROMPTS[:1], ["42"])[0][-3:] == [four, two, eot]


def test_sampled_rollout_stops_at_the_end_of_turn():
    """The same through PPO's rollout engine, sampling at temperature 1 with log-probs."""
    from accelerate import Accelerator

    from stages.ppo.engines import HFEngine
    from stages.ppo.models import PolicyAndValue

    tokenizer = tokenizer_with_end_of_turn()
    policy = bigram_policy(tokenizer, {"<|assistant|>": "7", "7": END_OF_TURN, END_OF_TURN: "9", "9": "9"})
    seven, eot = tokenizer.convert_tokens_to_ids(["7", END_OF_TURN])
    engine = HFEngine(PolicyAndValue(policy, None), tokenizer, Accelerator(cpu=True))
    gen = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.0)
    out = engine.generate(render_prompts(tokenizer, PROMPTS), gen, with_logprobs=True)
    assert out.response_ids.tolist() == [[seven, eot]] * 2
    assert out.logprobs.shape == (2, 2) and (out.logprobs > -1e-6).all()  # each token's probability ~1
    assert out.lengths.tolist() == [2, 2] and out.ended.tolist() == [True, True]  # the engine says where each ended


def test_held_out_rm_score_reads_the_generated_tokens_as_a_rollout_does():
    """The held-out rm_score scores what the policy generated, token for token, as PPO's rollout does: a
    cut-off answer gets no end-of-turn appended and the text is not decoded and re-tokenised."""
    from accelerate import Accelerator

    from rlhf.data import HeldOut
    from rlhf.evaluation import evaluate_held_out, evaluate_in_loop, score_sequences
    from rlhf.registry import build_scalar_model
    from rlhf.tasks.subtraction import PROMPT

    source = resolve("tiny-llama")
    tokenizer = load_tokenizer(source, ModelInit())
    policy = build_policy(source, ModelInit(), tokenizer, seed=1).eval()
    reward_model = build_scalar_model(source, ModelInit(), tokenizer, seed=2).eval()
    examples = [
        {
            "prompt": [{"role": "user", "content": PROMPT % (a, b)}],
            "completion": [{"role": "assistant", "content": str(a - b)}],
        }
        for a, b in [(52, 17), (3, 40), (1000, 1), (7, 7)]
    ]
    gen = GenerationConfig(max_new_tokens=3)
    prompt_ids = render_prompts(tokenizer, [e["prompt"] for e in examples])
    _, response, _ = generate_ids(policy, tokenizer, prompt_ids, gen)
    ended, length = ended_at(response, stop_token_ids(tokenizer, policy.generation_config))
    assert not ended.all()  # some answers are cut off: a re-tokenised row would end in an appended end of turn
    rows = [p + r[:n] for p, r, n in zip(prompt_ids, response.tolist(), length.tolist(), strict=True)]
    expected = score_sequences(reward_model, rows, tokenizer.pad_token_id)
    held_out = HeldOut(validation=[], test=examples, validation_source="-", test_source="-")
    report = evaluate_held_out(policy, tokenizer, held_out, "subtraction", gen, reward_model)
    assert report["rm_score"] == round(expected.mean().item(), 4)
    in_loop = evaluate_in_loop(
        policy_wrapper(policy), reward_model, Accelerator(cpu=True), tokenizer, examples, "subtraction", gen
    )
    assert in_loop["eval/ppo/rm_score"] == pytest.approx(expected.mean().item(), abs=1e-6)


def policy_wrapper(policy):
    """evaluate_in_loop takes PPO's PolicyAndValue; only its `policy` generates."""
    wrapper = torch.nn.Module()
    wrapper.policy = policy
    return wrapper


def test_a_cut_off_response_padded_with_a_stop_id_is_not_finished():
    """Qwen2.5's pad id is also a stop id (<|endoftext|>). A response vLLM cut off at max_model_len is shorter
    than the batch and padded with it: read from the padding it would look finished (no missing-EOS penalty,
    the pad trained as its EOS). The engine says each row's length and whether it stopped; the rollout uses
    that. Also through the vLLM engine's conversion of its outputs, and dynamic sampling's concatenation."""
    from types import SimpleNamespace

    from stages.ppo.rollout import Generated
    from stages.ppo.sampling import _cat_groups, episode_tensors
    from stages.ppo.vllm_engine import as_generated

    tokenizer = SimpleNamespace(pad_token_id=0)  # 0: pad and a stop id
    query = torch.tensor([[5, 6], [0, 7]])
    response = torch.tensor([[8, 9, 0, 0], [8, 8, 8, 8]])  # row 0: cut off after 2 tokens, then pads (= stop id)
    sampled = Generated(
        prompt_ids=query,
        response_ids=response,
        logprobs=None,
        lengths=torch.tensor([2, 4]),
        ended=torch.tensor([False, False]),
    )
    _, attention_mask, resp_mask, has_eos = episode_tensors(sampled, tokenizer)
    assert has_eos.tolist() == [False, False]
    assert resp_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0]  # the reward model is read at the last real token

    finished = SimpleNamespace(token_ids=[8, 0], finish_reason="stop", logprobs=None)  # stopped at its stop id
    cut = SimpleNamespace(token_ids=[8, 9], finish_reason="length", logprobs=None)  # max_model_len
    long = SimpleNamespace(token_ids=[8, 8, 8, 8], finish_reason="length", logprobs=None)
    outputs = [SimpleNamespace(outputs=[o]) for o in (finished, cut, long)]
    got = as_generated(outputs, [[5, 6], [7], [7]], pad_id=0, with_logprobs=False)
    assert got.response_ids.tolist() == [[8, 0, 0, 0], [8, 9, 0, 0], [8, 8, 8, 8]]
    assert got.lengths.tolist() == [2, 2, 4] and got.ended.tolist() == [True, False, False]

    both = _cat_groups([(got, 0, 0), (sampled, 1, 1)], 1, pad_id=0)  # group size 1: row g of each
    assert both.lengths.tolist() == [2, 4] and both.ended.tolist() == [True, False]
