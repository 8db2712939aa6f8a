"""Step 1 of PPO, which prompts and how many answers: each step's resume-stable batch of the
training prompts (stages/ppo/prompts.py), and `samples_per_prompt` sampled responses to each
(adjacent rows), with DAPO's dynamic sampling when configured."""

from __future__ import annotations

import torch

from stages.ppo.rollout import Generated, response_mask
from stages.ppo.run import PPORun
from stages.ppo.scores import score_episodes


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


def sample_groups(
    run: PPORun, batch: list[int], step: int, with_logprobs: bool
) -> tuple[list[int], Generated, dict[str, float]]:
    """Step 1: (episodes, sampled, stats): samples_per_prompt responses to each prompt of `batch`,
    adjacent, and each row's prompt index. With rollout.dynamic_sampling (DAPO, Yu et al. 2025,
    §3.2) they are scored first (step 3 scores the kept rows again) and groups whose scores are all
    equal are dropped: they give every response a zero advantage. More prompts are drawn, from a
    stream seeded per try so a resumed run draws the same, until every process holds
    prompts_per_step groups or max_sampling_tries rounds ran; a process still short fills up with
    dropped groups (as veRL keeps shapes fixed; it raises instead)."""
    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    roll, n = cfg.rollout, cfg.rollout.samples_per_prompt

    def draw(prompts: list[int]) -> tuple[list[int], Generated]:
        episodes = [i for i in prompts for _ in range(n)]
        sampled = run.engine.generate([data.prompt_ids[i] for i in episodes], roll.generation, with_logprobs)
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
        input_ids, attention_mask, _, has_eos = episode_tensors(sampled, run.models.tokenizer)
        raw = score_episodes(run, episodes, input_ids, attention_mask, sampled.response_ids, has_eos)
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
    return episodes, _cat_groups(chosen, n, run.models.tokenizer.pad_token_id), stats


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
