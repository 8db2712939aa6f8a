"""Step 3 of PPO: one score per response, the weighted sum of the reward sources (stages/ppo/rewards.py)
with the missing-EOS and overlong shaping, then optional normalisation and clipping."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.config.stages import PPORewardConfig
from rlhf.generation import decode_responses
from rlhf.reward_functions import row_fields
from rlhf.tasks import gold_checker
from stages.ppo.core_algos import RunningMoments
from stages.ppo.rewards import Episodes
from stages.ppo.rollout import Scored
from stages.ppo.run import PPORun


def combine_scores(components: dict[str, torch.Tensor], has_eos: torch.Tensor, cfg: PPORewardConfig) -> torch.Tensor:
    """score = Σ weight · score over the sources, in their configured order (a weight-0 source is
    logged, not added), + the penalty if the response never emitted a stop token (EOS or the
    template's end of turn). components: source name -> (B,). (B,) fp32"""
    score = torch.zeros_like(has_eos, dtype=torch.float32)
    for name, source in cfg.active().items():
        if source.weight:
            score = score + source.weight * components[name].float()
    if cfg.missing_eos_penalty is not None:
        score = torch.where(has_eos, score, score + cfg.missing_eos_penalty)
    return score


def normalize_scores(
    scores: torch.Tensor, all_scores: torch.Tensor, cfg: PPORewardConfig, running: RunningMoments
) -> torch.Tensor:
    """Whiten by this step's scores across processes (`batch`) or by all scores so far
    (`running`), then clip to ±clip. scores (B,) local; all_scores (N,) gathered."""
    if cfg.normalize == "batch":
        scores = (scores - all_scores.mean()) / (all_scores.std(unbiased=False) + 1e-8)
    elif cfg.normalize == "running":
        running.update(all_scores)
        scores = (scores - running.mean) / running.std
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, cfg: PPORewardConfig) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times `overlong_penalty` p: with L the buffer,
    0 up to max_new_tokens − L tokens, then −p·(length − (max_new_tokens − L)) / L, reaching −p at max_new_tokens
    (a response cannot be longer). lengths (B,) response tokens including EOS -> (B,) fp32, ≤ 0."""
    start = max_new_tokens - cfg.overlong_buffer
    excess = (lengths.float() - start).clamp(min=0.0)
    return -cfg.overlong_penalty * (excess / cfg.overlong_buffer).clamp(max=1.0)


def gold_scores(task_name: str | None, answers: Sequence[str | None], texts: Sequence[str], device) -> torch.Tensor:
    """The task's checker on each response against its prompt's reference answer: 1.0 right, 0.0
    wrong, NaN where the prompt carries no answer. (B,) fp32. This is the *gold* measure a learned
    reward is a proxy for (Gao et al. 2022): logged as train/ppo/gold, never part of the score."""
    check = gold_checker(task_name)
    gold = [float("nan") if a is None else float(check(t, a)) for t, a in zip(texts, answers, strict=True)]
    return torch.tensor(gold, device=device, dtype=torch.float32)


def score_episodes(
    run: PPORun,
    batch: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response: torch.Tensor,
    has_eos: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
) -> Scored:
    """Step 3: every reward source's score of each response, their weighted sum (+ the missing-EOS
    and overlong shaping), before normalisation. `batch`: each row's prompt index; input_ids and
    attention_mask (B, P + R), response (B, R), has_eos (B,) as `episode_tensors` gives them;
    ref_logprobs (B, R): step 2's reference log-probs at temperature 1, where it has them."""
    models, cfg = run.models, run.cfg
    response_mask = attention_mask[:, -response.shape[1] :]  # as the engine said: up to its stop, or cut off
    lengths = response_mask.sum(1)
    texts = decode_responses(models.tokenizer, response, lengths, has_eos)  # each without its stop token
    rows = [run.data.prompts[i] for i in batch]
    episodes = Episodes(
        prompts=[row["prompt"] for row in rows],  # chat messages
        responses=texts,
        fields=row_fields(rows),  # answer, tests, …: the prompt rows' other fields, one list each
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_ids=response,
        response_mask=response_mask,
        ref_logprobs=ref_logprobs,
    )
    components = {name: source(episodes) for name, source in models.reward_sources.items()}  # each (B,)
    raw = combine_scores(components, has_eos, cfg.reward)  # (B,)
    # the gold measure: logged, never added to `raw` (a rule source is how to optimise it)
    gold = gold_scores(cfg.task.name, [row.get("answer") for row in rows], texts, run.accelerator.device)
    if cfg.reward.overlong_buffer is not None:  # DAPO's soft overlong punishment: shaping, logged beside the sources
        components["overlong"] = overlong_penalty(lengths, cfg.rollout.generation.max_new_tokens, cfg.reward)
        raw = raw + components["overlong"]
    return Scored(
        raw_scores=raw,
        components=components,
        gold_scores=gold,
        has_eos=has_eos,
        questions=[p[-1]["content"] for p in episodes.prompts],
        texts=texts,
    )
