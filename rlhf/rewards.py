"""Rule-based reward functions for PPO, combined with the reward model's score by configured
weights (`reward.rules: {name: weight}`). Each takes the prompts' last user message and the
responses and returns one float per response."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf.tasks import subtraction


def subtraction_exact(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for the exact difference (seed 000's scoring), 0.0 otherwise; 0.0 for a prompt that
    holds no subtraction question."""
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            x, y = subtraction.parse_question(question)
        except ValueError:
            out.append(0.0)
            continue
        out.append(1.0 if subtraction.is_correct(response, str(x - y)) else 0.0)
    return out


def subtraction_digits(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Partial credit: the share of the difference's characters (sign and digits, aligned from the
    units digit) that the response has right, over the longer of the two; 1.0 only for the exact
    difference, 0.0 for a prompt that holds no subtraction question. A denser signal than exact
    match: an answer with one digit wrong scores above one with all of them wrong."""
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            x, y = subtraction.parse_question(question)
        except ValueError:
            out.append(0.0)
            continue
        answer, given = str(x - y), response.strip()
        same = sum(a == b for a, b in zip(reversed(answer), reversed(given), strict=False))
        out.append(same / max(len(answer), len(given)))
    return out


RULES: dict[str, Callable[[Sequence[str], Sequence[str]], list[float]]] = {
    "subtraction": subtraction_exact,
    "subtraction_digits": subtraction_digits,
}
