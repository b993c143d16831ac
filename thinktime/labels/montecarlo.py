"""Monte Carlo step labels. A step's soft label is the share of K rollouts from the prefix ending with it that
reach the gold answer, its hard label whether any does (Math-Shepherd). `binary` search (OmegaPRM) measures
only the prefixes a binary search for the first wrong step visits and infers the rest: steps before it right,
steps from it on wrong. A finished chain's last step is labelled by the chain's own answer, with no rollouts."""
from __future__ import annotations

from dataclasses import dataclass, field

from thinktime.labels.chains import Chain
from thinktime.labels.rollouts import Roller, reaches_gold
from thinktime.strategies.base import to_candidate
from thinktime.strategies.steps import split_steps
from thinktime.types import Completion

SEARCHES = ("mc", "binary")


@dataclass
class Labelling:
    """One chain's steps and what is known of each prefix (index i: the prefix of i + 1 steps)."""

    chain: Chain
    steps: list[str]
    correct: bool  # the chain's own answer
    soft: list[float | None] = field(default_factory=list)
    measured: list[bool] = field(default_factory=list)
    tokens: int = 0  # the rollouts' tokens
    lo: int = 1  # binary search: the first wrong step is in [lo, hi] (hi = n + 1: none)
    hi: int = 1

    @property
    def finished(self) -> bool:
        return self.chain.finish == "stop" and bool(self.steps)


def start(chain: Chain, delimiter: str) -> Labelling:
    steps = split_steps(chain.text, delimiter)
    item = Labelling(chain, steps, reaches_gold(chain.text, chain.problem.gold, chain.finish),
                     [None] * len(steps), [False] * len(steps))
    if item.finished:  # its own answer measures the whole chain
        item.soft[-1] = 1.0 if item.correct else 0.0
    item.hi = len(steps) if item.finished else len(steps) + 1
    return item


def _record(items: list[Labelling], probes: list[tuple[Labelling, int]], roller: Roller) -> None:
    for (item, depth), (share, spent) in zip(probes, roller.shares([(i.chain, i.steps, d) for i, d in probes])):
        item.soft[depth - 1], item.measured[depth - 1] = share, True
        item.tokens += spent


def label_every_step(items: list[Labelling], roller: Roller) -> None:
    """Rollouts from every prefix whose value is not yet known, all chains in one engine call."""
    _record(items, [(i, d) for i in items for d in range(1, len(i.steps) + 1) if i.soft[d - 1] is None], roller)


def label_by_binary_search(items: list[Labelling], roller: Roller) -> None:
    """Each round measures one prefix per chain still searching (all chains in one call), halving its range."""
    for item in items:
        if item.finished and item.correct:  # no wrong step: every prefix reaches the gold through the chain
            item.lo = item.hi = len(item.steps) + 1
    active = [i for i in items if i.lo < i.hi]  # a one-step chain that ended wrong is known already
    while active:
        probes = [(i, (i.lo + i.hi) // 2) for i in active]
        _record(items, probes, roller)
        for item, depth in probes:
            if item.soft[depth - 1] > 0:
                item.lo = depth + 1
            else:
                item.hi = depth
        active = [i for i in active if i.lo < i.hi]
    for item in items:
        for d in range(1, len(item.steps) + 1):
            if item.soft[d - 1] is None or not item.measured[d - 1]:
                item.soft[d - 1] = 1.0 if d < item.lo else 0.0


def to_row(item: Labelling, rollouts: int, search: str, seconds: float) -> dict:
    """The stepwise JSONL row (TRL's prompt/completions/labels plus extras)."""
    soft = [round(float(s), 4) for s in item.soft]
    answer = to_candidate(Completion(item.chain.text, item.chain.finish, 0, 0)).answer
    return {"id": item.chain.problem.id, "chain": item.chain.index, "prompt": item.chain.problem.question,
            "completions": item.steps, "labels": [s > 0 for s in soft], "soft_labels": soft,
            "measured": item.measured, "gold": item.chain.problem.gold, "rollouts": rollouts, "search": search,
            "answer": answer, "correct": item.correct, "finish": item.chain.finish,
            "tokens": item.chain.tokens + item.tokens, "seconds": round(seconds, 4)}


def label_chains(chains: list[Chain], roller: Roller, search: str, delimiter: str) -> list[Labelling]:
    items = [start(c, delimiter) for c in chains]
    (label_by_binary_search if search == "binary" else label_every_step)(items, roller)
    return items
