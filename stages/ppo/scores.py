"""Step 3 of PPO: one score per response from the reward model, the rule rewards, the reward
functions and a remote reward model, with the missing-EOS penalty, then optional normalisation
and clipping."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlhf.config.stages import PPORewardConfig, RemoteRewardConfig
from rlhf.generation import decode_responses
from rlhf.registry import sequence_scores
from rlhf.reward_client import RemoteRewardError, RewardClient, ServedModelChanged
from rlhf.reward_functions import call_reward_function, row_fields
from rlhf.tasks import RULES, gold_checker
from stages.ppo.rollout import Scored, in_micro_batches


class RunningMoments:
    """Mean and std of every score seen so far (Chan et al.'s parallel update), for `normalize: running`."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        batch_mean, batch_var = x.float().mean().item(), x.float().var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def combine_scores(
    model_scores: torch.Tensor | None,
    rule_scores: dict[str, torch.Tensor],
    has_eos: torch.Tensor,
    cfg: PPORewardConfig,
    function_scores: dict[str, torch.Tensor] | None = None,
    remote_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """score = w_rm · r_rm + Σ w_i · rule_i + Σ w_f · function_f + w_remote · r_remote (+ penalty
    if the response never emitted a stop token, EOS or the template's end of turn). (B,)"""
    score = torch.zeros_like(has_eos, dtype=torch.float32)
    if model_scores is not None and cfg.model_weight:
        score = score + cfg.model_weight * model_scores.float()
    for name, weight in cfg.rules.items():
        score = score + weight * rule_scores[name].float()
    for spec, weight in cfg.functions.items():
        score = score + weight * function_scores[spec].float()
    if cfg.remote.url:
        score = score + cfg.remote.weight * remote_scores.float()
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


def connect_reward_server(cfg: RemoteRewardConfig, accelerator) -> RewardClient:
    """A client of the reward server for this process, which has read the served model's
    fingerprint; every process stops if any cannot reach it."""
    client = RewardClient(cfg)
    on_every_process(client.connect, cfg.url, accelerator)
    return client


def remote_model_scores(
    client: RewardClient, prompts: Sequence[list[dict]], responses: Sequence[str], accelerator
) -> torch.Tensor:
    """The served reward model's scores of this process's episodes (B,). Every process asks the
    server for its own."""
    scores = on_every_process(lambda: client.scores(prompts, responses), client.cfg.url, accelerator)
    return torch.tensor(scores, device=accelerator.device, dtype=torch.float32)


def on_every_process(call: Callable, url: str, accelerator):
    """call() on this process; if it failed on any process, all stop (RemoteRewardError, exit code
    3, or ServedModelChanged, exit code 2), so that no process waits forever at the next collective."""
    error, result = None, None
    try:
        result = call()
    except (RemoteRewardError, ServedModelChanged) as e:
        error = e
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RemoteRewardError(f"reward server {url} failed on another process; see its log")
    return result


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


def score_episodes(models, data, batch, input_ids, attention_mask, response, has_eos, cfg, accelerator) -> Scored:
    """Step 3: one score per response from the reward model, the rule rewards, the reward
    functions and the remote reward model (+ the missing-EOS penalty), before normalisation."""
    lengths = attention_mask[:, -response.shape[1] :].sum(1)  # as the engine said: up to its stop, or cut off
    texts = decode_responses(models.tokenizer, response, lengths, has_eos)  # each without its stop token
    rows = [data.prompts[i] for i in batch]
    prompts = [row["prompt"] for row in rows]  # chat messages
    questions = [p[-1]["content"] for p in prompts]
    model_scores = None
    if models.reward_model is not None:
        with torch.no_grad(), accelerator.autocast():
            model_scores = in_micro_batches(
                lambda ids, mask: sequence_scores(models.reward_model, ids, mask),
                cfg.rollout.forward_batch_size,
                input_ids,
                attention_mask,
            )
    device = accelerator.device
    rules = {name: torch.tensor(RULES[name](questions, texts), device=device) for name in cfg.reward.rules}
    fields = row_fields(rows)  # answer, tests, …: the prompt rows' other fields, one list each
    functions = {
        spec: torch.tensor(call_reward_function(spec, prompts, texts, fields), device=device, dtype=torch.float32)
        for spec in cfg.reward.functions
    }
    remote = None
    if models.reward_client is not None:
        remote = remote_model_scores(models.reward_client, prompts, texts, accelerator)
    raw = combine_scores(model_scores, rules, has_eos, cfg.reward, functions, remote)  # (B,)
    # the gold measure: logged, never added to `raw` (a rule in reward.rules is how to optimise it)
    gold = gold_scores(cfg.task.name, [row.get("answer") for row in rows], texts, device)
    if cfg.reward.overlong_buffer is not None:  # DAPO's soft overlong punishment, logged as a rule
        lengths = attention_mask[:, -response.shape[1] :].sum(1)
        rules["overlong"] = overlong_penalty(lengths, cfg.rollout.generation.max_new_tokens, cfg.reward)
        raw = raw + rules["overlong"]
    return Scored(
        raw_scores=raw,
        model_scores=model_scores,
        rule_scores=rules,
        function_scores=functions,
        remote_scores=remote,
        gold_scores=gold,
        has_eos=has_eos,
        questions=questions,
        texts=texts,
    )
