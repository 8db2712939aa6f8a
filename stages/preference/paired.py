"""What ORPO and CPO/SimPO share: both are TRL's older-style trainers (trl.experimental in TRL
1.16) that read pairs as token ids with labels, {prompt,chosen,rejected}_input_ids, _attention_mask
and chosen/rejected _labels (−100 on the prompt), and tokenise text in their constructor. We hand
them the rows already tokenised (the sequence the policy writes, as DPO's `encode_dpo_pairs`), so
their tokenising step passes rows through. A method's `encode` is DPO's `encode_dpo_pairs`, its
`limit` `limit_and_label` below."""

from __future__ import annotations

from rlhf.config import DataConfig
from stages.dpo.train import limit_pair_length

IGNORE = -100  # label of a token left out of the loss (the prompt, padding)


class TokenRows:
    """Mixed into an ORPO / CPO trainer: rows arrive tokenised (`limit_and_label`)."""

    def tokenize_row(self, feature, model=None) -> dict:
        return feature


def trainer_settings(max_length: int) -> dict:
    """The TRL ORPO / CPO config settings both stages pass: rows arrive tokenised and cut to
    `max_length` (`limit_and_label`), so TRL keeps every column and tokenises nothing itself."""
    return {
        "max_length": max_length,
        "disable_dropout": True,
        "remove_unused_columns": False,  # the collator reads every column
        "prediction_loss_only": True,
        "dataset_num_proc": None,
    }


def labelled_row(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    """One pair's columns: each answer follows the prompt, and only its tokens are labelled. By hand:
    prompt [1, 2], chosen [3] -> chosen_input_ids [1, 2, 3], chosen_labels [−100, −100, 3]."""
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        row[f"{name}_input_ids"] = prompt + answer
        row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{name}_labels"] = [IGNORE] * len(prompt) + answer
    return row


def limit_and_label(rows: list[dict], data: DataConfig) -> tuple[list[dict], int]:
    """DPO's rows (`encode_dpo_pairs`) -> (the TRL ORPO / CPO collator's rows, n over-long): over-long
    pairs as DPO's `limit_pair_length`; with `truncate` each answer is cut here to fit (keep the
    start), which TRL's own tokenising step did and which is passed through."""
    kept, over = limit_pair_length(rows, data)
    return [
        labelled_row(
            r["prompt_ids"],
            r["chosen_ids"][: data.max_length - len(r["prompt_ids"])],
            r["rejected_ids"][: data.max_length - len(r["prompt_ids"])],
        )
        for r in kept
    ], over
