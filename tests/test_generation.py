"""Generation decodes exactly as our GenerationConfig says, whatever decoding defaults the model's
own generation_config.json carries (hub models ship repetition penalties, top-k, top-p)."""

import torch

from rlhf.config import GenerationConfig, ModelInit
from rlhf.generation import generate_ids, left_pad, render_prompts
from rlhf.registry import build_policy, load_tokenizer, resolve

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
    _, response = generate_ids(policy, tokenizer, rows, gen)
    expected = manual_greedy(policy, tokenizer, rows, response.shape[1])
    # up to the first EOS (after it generate pads), the tokens are the plain argmax
    for got, want in zip(response.tolist(), expected.tolist(), strict=True):
        n = got.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in got else len(got)
        assert got[:n] == want[:n]


def test_sampling_is_not_truncated_by_the_models_top_k():
    policy, tokenizer = polluted_policy()  # its own config says top_k=1: every sample would be the argmax
    rows = render_prompts(tokenizer, PROMPTS[:1]) * 16
    torch.manual_seed(0)
    _, response = generate_ids(policy, tokenizer, rows, GenerationConfig(max_new_tokens=4, do_sample=True))
    assert len({tuple(r) for r in response.tolist()}) > 8  # an untrained 576-token model: samples differ
