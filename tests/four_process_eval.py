"""Run by tests/test_distributed.py under `accelerate launch --num_processes 4`: PPO's in-loop
evaluation (rlhf/evaluation.py `evaluate_in_loop`) of 9 held-out items, which 4 processes cannot
split evenly: 3, 2, 2, 2, and accelerate pads each short shard with the set's last item (8).

Every process first answers all 9 itself, in one batch, with the same greedy policy. Items 0, 4
and 7 get that answer as their reference (right), the others an answer no model here can write
(wrong), so the accuracy says which items were counted: 3/9 when each is counted once. The old
code sliced the gathered shards, 0 1 2 | 3 4 8 | 5 6 8 | 7 8 8, to their first 9 entries: item 7
lost, item 8 counted twice, 2/9. The main process writes the in-loop metrics and the expected ones
to argv[1]."""

import json
import sys

from accelerate import Accelerator

from rlhf.config import GenerationConfig, ModelInit
from rlhf.evaluation import evaluate_in_loop, score_sequences
from rlhf.generation import generate_answers
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve
from stages.ppo.models import PolicyAndValue

N, RIGHT = 9, {0, 4, 7}
NEVER = "\N{SNOWMAN}"  # not in the tiny tokenizer's vocabulary: never generated

accelerator = Accelerator(cpu=True)
source = resolve("tiny-llama")
tokenizer = load_tokenizer(source, ModelInit())
policy = build_policy(source, ModelInit(), tokenizer, seed=0)
reward_model = build_scalar_model(source, ModelInit(), tokenizer, seed=1).eval()
gen = GenerationConfig(max_new_tokens=4)

prompts = [[{"role": "user", "content": f"{50 + 7 * i}-{3 * i}="}] for i in range(N)]
answers, _, sequences = generate_answers(policy, tokenizer, prompts, gen)  # (N,) the whole set in one batch
examples = [
    {"prompt": p, "completion": [{"role": "assistant", "content": a if i in RIGHT else NEVER}]}
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
]
expected = {
    "eval/ppo/n": N,
    "eval/ppo/accuracy": round(len(RIGHT) / N, 4),
    "eval/ppo/rm_score": score_sequences(reward_model, sequences, tokenizer.pad_token_id).mean().item(),
}

model = accelerator.prepare(PolicyAndValue(policy, None))
in_loop = evaluate_in_loop(model, reward_model, accelerator, tokenizer, examples, None, gen)
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as f:
        json.dump({"in_loop": in_loop, "expected": expected, "processes": accelerator.num_processes}, f)
accelerator.wait_for_everyone()
accelerator.end_training()
