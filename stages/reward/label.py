"""An RLHF round's comparisons (seed 002; InstructGPT's later rounds): the current policy answers
fresh prompts K times, a labeller (stages/reward/labellers.py) orders the answers, and every
ordered pair becomes a stage-2 pair in pairs.jsonl (training) or eval_pairs.jsonl (held out, for
the reward model's accuracy before and after its refresh). One process; one file, top to bottom:

  1. fresh prompts: the task's training items drawn with a seed offset of 100 · round (or data.train)
  2. K sampled answers per prompt from the policy (distinct, non-empty ones kept)
  3. the labeller's ordered pairs; their agreement with the task's checker
  4. the reward model before the refresh scores the held-out pairs ("before" accuracy)
  5. pairs.jsonl, eval_pairs.jsonl, best.jsonl, eval.json, manifest.json

best.jsonl is rejection sampling (best of K): per training prompt, the first sampled answer the
task's checker passes, as an SFT record. Sampling the starting model this way (the pipeline's
first-round `label` stage, e.g. configs/smollm2-135m/constraints.yaml) gives SFT data of the
model's own passing answers and the reward model's pairs from one pass of sampling.

    accelerate launch launch/stage2_label.py --config configs/tiny/label.yaml policy=runs/x/ppo reward_model=runs/x/rm
"""

from __future__ import annotations

import json
import logging
import time

import torch
from accelerate.utils import set_seed

from rlhf.checkpoint import atomic_write_text, finish_stage, start_stage
from rlhf.config import LabelStageConfig
from rlhf.data import DataError, load_records
from rlhf.data.prompts import normalize_prompts
from rlhf.distributed import process_state, wait_for_main, whole_models
from rlhf.evaluation import score_responses
from rlhf.generation import generate_text
from rlhf.precision import resolve_precision
from rlhf.registry import build_policy, build_scalar_model, load_tokenizer, resolve
from rlhf.tasks import gold_checker, task_records
from stages.reward.labellers import LABELLERS, Labelling, gold_agreement

log = logging.getLogger("rlhf.label")


def label(cfg: LabelStageConfig) -> dict:
    """Sample the policy on fresh prompts, label the answers, write the pairs (see the module doc)."""
    state = process_state()
    precision = resolve_precision(cfg.model_init)
    set_seed(cfg.seed)
    started = time.time()
    source = resolve(cfg.policy)
    tokenizer = load_tokenizer(source, cfg.model_init)
    rows = fresh_prompts(cfg)
    with whole_models():
        policy = build_policy(source, cfg.model_init, tokenizer, seed=cfg.seed, precision=precision).eval()
        judge, judge_tokenizer = load_judge(cfg, precision)
    if not state.is_main_process:  # one process labels; the others wait for the manifest
        wait_for_main()
        return {}

    split = {"train": rows[: cfg.prompts], "eval": rows[cfg.prompts :]}
    report: dict = {"labeller": cfg.labeller.name, "samples_per_prompt": cfg.samples_per_prompt}
    pairs: dict[str, list[dict]] = {}
    best: list[dict] = []
    for name, part in split.items():
        # 2. K answers per prompt; 3. the labeller's pairs (and the other labellers' agreement)
        job = Labelling(
            prompts=[r["prompt"] for r in part],
            responses=sample_answers(policy, tokenizer, [r["prompt"] for r in part], cfg),
            answers=[r.get("answer") for r in part],
            task=cfg.task.name,
            function=cfg.labeller.function,
            principle=cfg.labeller.principle,
            judge=judge,
            judge_tokenizer=judge_tokenizer,
        )
        found = LABELLERS[cfg.labeller.name](job)
        pairs[name] = pair_records(job, found, f"round-{cfg.round}")
        passing = best_records(job)
        if name == "train":
            best = passing
        report[name] = split_report(job, found, len(passing), cfg.labeller.compare if name == "eval" else ())
        log.info("%s: %d prompts -> %d pairs; %s", name, len(part), len(pairs[name]), report[name])

    # 4. the reward model before its refresh, on the held-out pairs of this policy's samples
    if cfg.reward_model and pairs["eval"]:
        report["rm_accuracy_before"] = rm_accuracy(cfg, pairs["eval"], tokenizer, precision)
    # 5. the files; the output directory is taken only now, so that a labeller that fails leaves
    #    an earlier output as it was
    out = start_stage(cfg.output_dir, cfg, True, every_process=False)  # the others have returned
    for file, records in (("pairs.jsonl", pairs["train"]), ("eval_pairs.jsonl", pairs["eval"]), ("best.jsonl", best)):
        atomic_write_text(out / file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    metrics = {"pairs": len(pairs["train"]), "eval_pairs": len(pairs["eval"]), "best": len(best)}
    finish_stage(
        out,
        cfg,
        stage="label",
        model=cfg.policy,
        base_model=source.root,
        inputs=(cfg.policy, cfg.reward_model),
        metrics=metrics,
        started=started,
        eval_report=report,
    )
    wait_for_main()
    return metrics


def load_judge(cfg: LabelStageConfig, precision) -> tuple[torch.nn.Module | None, object]:
    """The judge's model and tokenizer where the labeller or a compared one is `judge`, else None."""
    if "judge" not in (cfg.labeller.name, *cfg.labeller.compare):
        return None, None
    judge_source = resolve(cfg.labeller.judge)
    judge_tokenizer = load_tokenizer(judge_source, cfg.model_init)
    judge = build_policy(judge_source, cfg.model_init, judge_tokenizer, seed=cfg.seed, precision=precision)
    return judge.eval(), judge_tokenizer


def split_report(job: Labelling, found, best_of_k: int, compare: tuple[str, ...]) -> dict:
    """eval.json's block for one split: prompts, pairs, prompts with a passing answer (best of K),
    the share of answers the checker passes, the labeller's agreement with the checker, and that of
    each labeller in `compare` (run on the same samples only to be measured, e.g. the judge: RLAIF's
    agreement with the human stand-in; the held-out split only, as a judge reads every pair twice)."""
    agreement, decidable = gold_agreement(job, found)
    out = {
        "prompts": len(job.prompts),
        "pairs": sum(len(f) for f in found),
        "best_of_k": best_of_k,
        "policy_gold": policy_gold(job),
        "gold_agreement": agreement,
        "gold_decidable_pairs": decidable,
    }
    for name in compare:
        other = LABELLERS[name](job)
        share, n = gold_agreement(job, other)
        out[f"{name}_gold_agreement"], out[f"{name}_gold_decidable_pairs"] = share, n
        out[f"{name}_pairs"] = sum(len(f) for f in other)
    return out


def fresh_prompts(cfg: LabelStageConfig) -> list[dict]:
    """prompts + eval_prompts rows {"prompt": chat, "answer": str | None}: data.train, or the
    task's training items drawn with seed offset 100 · round (neither the SFT nor PPO's items)."""
    records, where = load_records(
        cfg.data, cfg.task, "train", generate=lambda: task_records(cfg.task, "train", seed_offset=100 * cfg.round)
    )
    rows = normalize_prompts(records)
    wanted = cfg.prompts + cfg.eval_prompts
    if len(rows) < wanted:
        raise DataError(where, None, f"holds {len(rows)} prompts; prompts + eval_prompts = {wanted}")
    return rows[:wanted]


@torch.no_grad()
def sample_answers(policy, tokenizer, prompts: list[list[dict]], cfg: LabelStageConfig) -> list[list[str]]:
    """K sampled answers per prompt, the distinct non-empty ones (white space stripped), in order."""
    k = cfg.samples_per_prompt
    texts = generate_text(policy, tokenizer, [p for p in prompts for _ in range(k)], cfg.generation)
    return [
        list(dict.fromkeys(t.strip() for t in texts[i * k : (i + 1) * k] if t.strip())) for i in range(len(prompts))
    ]


def pair_records(job: Labelling, found: list[list[tuple[int, int]]], kind: str) -> list[dict]:
    """Stage-2 pairs: {"prompt": chat, "chosen": text, "rejected": text, "kind"}."""
    return [
        {"prompt": prompt, "chosen": responses[better], "rejected": responses[worse], "kind": kind}
        for prompt, responses, ordered in zip(job.prompts, job.responses, found, strict=True)
        for better, worse in ordered
    ]


def best_records(job: Labelling) -> list[dict]:
    """Rejection sampling: per prompt, the first of its sampled answers (in sampling order, so no
    preference for short or long ones) that the task's checker passes, as an SFT record
    {"messages": [*prompt, assistant]}; prompts with none (or no reference answer) give nothing."""
    check = gold_checker(job.task)
    out = []
    for prompt, responses, answer in zip(job.prompts, job.responses, job.answers, strict=True):
        passing = [r for r in responses if answer is not None and check(r, answer)]
        if passing:
            out.append({"messages": [*prompt, {"role": "assistant", "content": passing[0]}]})
    return out


def policy_gold(job: Labelling) -> float | None:
    """The share of the sampled (distinct) answers the task's checker calls right."""
    check = gold_checker(job.task)
    hits = [check(r, a) for rs, a in zip(job.responses, job.answers, strict=True) if a is not None for r in rs]
    return sum(hits) / len(hits) if hits else None


def rm_accuracy(cfg: LabelStageConfig, pairs: list[dict], tokenizer, precision) -> float:
    """The share of `pairs` the reward model scores chosen above rejected."""
    rm_source = resolve(cfg.reward_model)
    with whole_models():
        reward_model = build_scalar_model(rm_source, cfg.model_init, tokenizer, precision=precision).eval()
    prompts = [p["prompt"] for p in pairs]
    chosen = score_responses(reward_model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = score_responses(reward_model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return round((chosen > rejected).float().mean().item(), 4)
