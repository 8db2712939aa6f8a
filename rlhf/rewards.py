"""Rule-based reward functions for PPO, combined with the reward model's score by configured
weights (`reward.rules: {name: weight}`). Each takes the prompts' last user message and the
responses and returns one float per response."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf.tasks import subtraction


def _per_question(
    questions: Sequence[str], responses: Sequence[str], score: Callable[[str, str], float]
) -> list[float]:
    """score(difference, response) for each subtraction question; 0.0 for a prompt that holds none."""
    out = []
    for question, response in zip(questions, responses, strict=True):
        try:
            x, y = subtraction.parse_question(question)
        except ValueError:
            out.append(0.0)
            continue
        out.append(score(str(x - y), response))
    return out


def subtraction_exact(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for the exact difference (seed 000's scoring), 0.0 otherwise; 0.0 for a prompt that
    holds no subtraction question."""
    return _per_question(questions, responses, lambda answer, given: float(subtraction.is_correct(given, answer)))


def subtraction_digits(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Partial credit: the share of the difference's characters (sign and digits, aligned from the
    units digit) that the response has right, over the longer of the two; 1.0 only for the exact
    difference, 0.0 for a prompt that holds no subtraction question. A denser signal than exact
    match: an answer with one digit wrong scores above one with all of them wrong."""

    def share_right(answer: str, given: str) -> float:
        given = given.strip()
        same = sum(a == b for a, b in zip(reversed(answer), reversed(given), strict=False))
        return same / max(len(answer), len(given))

    return _per_question(questions, responses, share_right)


RULES: dict[str, Callable[[Sequence[str], Sequence[str]], list[float]]] = {
    "subtraction": subtraction_exact,
    "subtraction_digits": subtraction_digits,
}
