"""Majority voting over answers compared by math equivalence (never by string similarity).

Tie rule: among answers with equal weight, the one that appeared first wins (sample order is the
engine's order, which a seed makes reproducible).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thinktime.answers import equivalent, normalize


def is_guess(candidate) -> bool:
    """A chain cut short (token limit, cancel) whose answer is only its last number: there, almost always an
    intermediate value. A box or "the answer is" in a cut chain is still an answer."""
    return candidate.finish_reason in ("length", "cancelled", "low_confidence") and \
        candidate.answer_method == "last-number"


def vote_answers(candidates: Sequence) -> list[str | None]:
    """The answers chains vote with: guesses (see is_guess) only when no chain gave a real answer, so one chain alone
    keeps the answer it reports (maj@1 is cot's answer), and five cut chains' guesses never outvote two boxes."""
    real = [None if is_guess(c) else c.answer for c in candidates]
    return real if any(a is not None for a in real) else [c.answer for c in candidates]


@dataclass
class VoteGroup:
    answer: str  # the first-seen spelling of this answer
    weight: float
    members: list[int]  # indices of the candidates that gave it


def group_answers(answers: Sequence[str | None], weights: Sequence[float] | None = None,
                  timeout: float = 5.0) -> list[VoteGroup]:
    """Groups of equivalent answers, heaviest first; None answers cast no vote."""
    weights = weights if weights is not None else [1.0] * len(answers)
    groups: list[VoteGroup] = []
    by_normal: dict[str, VoteGroup] = {}
    for i, (answer, weight) in enumerate(zip(answers, weights)):
        if answer is None or not normalize(answer):
            continue
        key = normalize(answer)
        group = by_normal.get(key)
        if group is None:
            group = next((g for g in groups if equivalent(g.answer, answer, timeout)), None)
        if group is None:
            group = VoteGroup(answer, 0.0, [])
            groups.append(group)
        by_normal[key] = group
        group.weight += weight
        group.members.append(i)
    # sorted() is stable: equal weights keep first-seen order, which is the tie rule.
    return sorted(groups, key=lambda g: -g.weight)


def majority(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> VoteGroup | None:
    groups = group_answers(answers, weights)
    return groups[0] if groups else None
