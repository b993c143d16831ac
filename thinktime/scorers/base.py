"""What every scorer does: give each step of each chain a score in [0, 1], higher is better."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from thinktime.errors import BadInputError

AGGREGATES = ("last", "min", "prod", "mean")


class Scorer(ABC):
    """Scores chains split into steps. An outcome scorer gives one score (for the last step) per chain."""

    name: str = "scorer"
    #: True when it judges each step; False when it judges the whole chain only (ORM, self-judge)
    per_step: bool = True

    @abstractmethod
    def score(self, question: str, chains: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each chain (a list of steps), a score per step (or one score when not `per_step`)."""

    def score_ended(self, question: str, chains: Sequence[Sequence[str]], ended: Sequence[bool]) -> list[list[float]]:
        """`score`, told which chains have ended (an answer given, or the turn over): a scorer that continues a
        chain (rollouts to an answer) must not continue those. Scorers of the text alone ignore it."""
        return self.score(question, chains)

    def close(self) -> None:
        """Release the model's memory."""


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One number for a chain from its step scores.

    last: the score of the final step (the PRM's view of the whole chain; search-and-learn's default);
    min: the weakest step (a chain is only as good as its worst step); prod: all steps right together;
    mean: the average step.
    """
    if how not in AGGREGATES:
        raise BadInputError(f"unknown score aggregate {how!r}", hint=f"use one of {', '.join(AGGREGATES)}")
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    return float(sum(step_scores) / len(step_scores))
