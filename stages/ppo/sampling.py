"""Step 1 of PPO, which prompts and how many answers: the training prompts, each step's
resume-stable batch of them, and `samples_per_prompt` sampled responses to each (adjacent rows),
with DAPO's dynamic sampling when configured."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhf.config import PPOStageConfig
from rlhf.data import DataError, HeldOut, load_held_out, load_records
from rlhf.data.lengths import context_length
from rlhf.data.prompts import normalize_prompts
from rlhf.generation import render_prompts
from rlhf.tasks import task_records
from stages.ppo.rollout import Generated, response_mask
from stages.ppo.scores import score_episodes

log = logging.getLogger("rlhf.ppo")


@dataclass(kw_only=True)
class Prompts:
    prompts: list[dict]  # normalised chat prompts for training
    prompt_ids: list[list[int]]  # their rendered token ids
    eval_examples: list[dict]  # the validation split's prompts with a reference completion (in-loop evaluation)
    test_examples: list[dict]  # the test split's (eval.json's before and after; nothing else)
    train_source: str
    eval_source: str
    test_source: str

    def held_out(self) -> HeldOut:
        return HeldOut(
            validation=self.eval_examples,
            test=self.test_examples,
            validation_source=self.eval_source,
            test_source=self.test_source,
        )


def load_prompts(cfg: PPOStageConfig, tokenizer) -> Prompts:
    """Training prompts (any SFT format; fresh task items by default) and both held-out splits'
    prompts with answers."""
    train_records, train_source = load_records(
        cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", seed_offset=20)
    )
    prompts = normalize_prompts(train_records)
    held_out = load_held_out(cfg.data, cfg.task)
    eval_examples = [e for e in held_out.validation if "completion" in e]
    test_examples = [e for e in held_out.test if "completion" in e]
    log.info("prompts: %d from %s; held out: %s", len(prompts), train_source, held_out.describe())
    prompt_ids = render_prompts(tokenizer, [p["prompt"] for p in prompts])
    prompts, prompt_ids = limit_prompts(prompts, prompt_ids, cfg, train_source, context_length(cfg.data, tokenizer))
    return Prompts(
        prompts=prompts,
        prompt_ids=prompt_ids,
        eval_examples=eval_examples,
        test_examples=test_examples,
        train_source=train_source,
        eval_source=held_out.validation_source,
        test_source=held_out.test_source,
    )


def limit_prompts(
    prompts: list[dict], prompt_ids: list[list[int]], cfg: PPOStageConfig, source: str, max_length: int
) -> tuple[list[dict], list[list[int]]]:
    """Prompts that leave room for a whole response within data.max_length tokens: longer ones are
    dropped or (data.overlong=truncate) cut to their last tokens, where the question and the
    assistant turn's start are. Unlimited, a long prompt ran past an absolute-position model's
    positions (an index error mid-run) and vLLM refused it."""
    limit = max_length - cfg.rollout.generation.max_new_tokens  # data.max_length, or the model's context
    over = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
    total = len(prompt_ids)
    if not over:
        return prompts, prompt_ids
    if cfg.data.overlong == "truncate":
        prompt_ids = [ids[-limit:] if len(ids) > limit else ids for ids in prompt_ids]
    else:
        keep = [i for i in range(len(prompts)) if len(prompt_ids[i]) <= limit]
        if not keep:
            raise DataError(
                source,
                None,
                f"every prompt is longer than data.max_length - rollout.generation.max_new_tokens = {limit} "
                "tokens; raise data.max_length",
            )
        prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    what = "cut to their end" if cfg.data.overlong == "truncate" else "dropped"
    log.warning("prompts: %d of %d longer than %d tokens, %s", len(over), total, limit, what)
    return prompts, prompt_ids


def prompt_batch(n: int, step: int, B: int, accelerator, seed: int) -> list[int]:
    """This process's B prompt indices (of n) for `step`: a fixed seeded permutation per pass
    over the prompts, so the order is the same after a resume."""
    start = (step * accelerator.num_processes + accelerator.process_index) * B
    out = []
    for i in range(start, start + B):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(perm[pos].item())
    return out


def sample_groups(models, engine, data, batch, cfg, accelerator, step: int, with_logprobs: bool):
    """Step 1: (episodes, sampled, stats): samples_per_prompt responses to each prompt of `batch`,
    adjacent, and each row's prompt index. With rollout.dynamic_sampling (DAPO, Yu et al. 2025,
    §3.2) they are scored first (step 3 scores the kept rows again) and groups whose scores are all
    equal are dropped: they give every response a zero advantage. More prompts are drawn, from a
    stream seeded per try so a resumed run draws the same, until every process holds
    prompts_per_step groups or max_sampling_tries rounds ran; a process still short fills up with
    dropped groups (as veRL keeps shapes fixed; it raises instead)."""
    roll, n = cfg.rollout, cfg.rollout.samples_per_prompt

    def draw(prompts: list[int]) -> tuple[list[int], Generated]:
        episodes = [i for i in prompts for _ in range(n)]
        sampled = engine.generate([data.prompt_ids[i] for i in episodes], roll.generation, with_logprobs)
        # the one move onto the models' device, for every engine: vLLM answers on the CPU, and the
        # policy, reference and reward forwards (and every tensor built from the samples) run there
        return episodes, sampled.to(accelerator.device)

    if not roll.dynamic_sampling:
        episodes, sampled = draw(batch)
        return episodes, sampled, {}
    kept, dropped = [], []  # (sampled, group index within it, prompt index)
    tries = 0
    while tries < roll.max_sampling_tries:
        seed = cfg.seed + 1_000_003 * tries  # try 0 is the usual stream
        prompts = batch if tries == 0 else prompt_batch(len(data.prompt_ids), step, len(batch), accelerator, seed)
        episodes, sampled = draw(prompts)
        tries += 1
        input_ids, attention_mask, _, has_eos = episode_tensors(sampled, models.tokenizer)
        raw = score_episodes(
            models, data, episodes, input_ids, attention_mask, sampled.response_ids, has_eos, cfg, accelerator
        )
        groups = raw.raw_scores.view(-1, n)
        for g, spread in enumerate((groups.max(1).values > groups.min(1).values).tolist()):
            (kept if spread else dropped).append((sampled, g, prompts[g]))
        fewest = accelerator.gather(torch.tensor([len(kept)], device=accelerator.device)).min().item()
        if fewest >= len(batch):
            break
    n_dropped = accelerator.reduce(torch.tensor(float(len(dropped)), device=accelerator.device), "sum").item()
    chosen = (kept + dropped)[: len(batch)]
    episodes = [prompt for _, _, prompt in chosen for _ in range(n)]
    stats = {"dropped_groups": n_dropped, "sampling_tries": float(tries)}
    return episodes, _cat_groups(chosen, n, models.tokenizer.pad_token_id), stats


def _cat_groups(chosen: list, n: int, pad_id: int) -> Generated:
    """The rows of the chosen groups (sampled, group index, _) as one batch: prompts left-padded and
    responses right-padded with the pad id to the widest, each row's length and finish kept as the
    engine said them."""
    P = max(s.prompt_ids.shape[1] for s, _, _ in chosen)
    R = max(s.response_ids.shape[1] for s, _, _ in chosen)
    prompts, responses, logprobs = [], [], []
    for s, g, _ in chosen:
        rows = slice(g * n, (g + 1) * n)
        prompts.append(torch.nn.functional.pad(s.prompt_ids[rows], (P - s.prompt_ids.shape[1], 0), value=pad_id))
        responses.append(torch.nn.functional.pad(s.response_ids[rows], (0, R - s.response_ids.shape[1]), value=pad_id))
        if s.logprobs is not None:
            logprobs.append(torch.nn.functional.pad(s.logprobs[rows], (0, R - s.logprobs.shape[1]), value=0.0))
    return Generated(
        prompt_ids=torch.cat(prompts),
        response_ids=torch.cat(responses),
        logprobs=torch.cat(logprobs) if logprobs else None,
        lengths=torch.cat([s.lengths[g * n : (g + 1) * n] for s, g, _ in chosen]),
        ended=torch.cat([s.ended[g * n : (g + 1) * n] for s, g, _ in chosen]),
    )


def episode_tensors(sampled: Generated, tokenizer):
    """(input_ids (B, P + R), attention_mask (B, P + R), response mask (B, R), has_eos (B,)). A
    response ends where the engine says (`sampled.lengths`: at its stop token, EOS or the template's
    end of turn, or where it was cut off), never where padding seems to say: a pad id may also be a
    stop id. The attention mask ends there too, so the reward model is read at that token."""
    query, response = sampled.prompt_ids, sampled.response_ids
    resp_mask, has_eos = response_mask(sampled.lengths, response.shape[1]), sampled.ended  # (B, R), (B,)
    # left pads are the only pads in a left-padded prompt; the pad id never appears inside one
    input_ids = torch.cat([query, response], dim=1)  # (B, P + R)
    attention_mask = torch.cat([(query != tokenizer.pad_token_id).long(), resp_mask], dim=1)  # (B, P + R)
    return input_ids, attention_mask, resp_mask, has_eos
