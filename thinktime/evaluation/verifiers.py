"""Verifiers against majority voting over the same sampled chains, and search runs beside them.

A self-consistency eval run (texts kept) gives N chains per problem. A scorer (a PRM, an ORM) rates each chain,
and each selection rule picks from the *same* first N chains, so only the rule differs:

    maj@N        the run's own vote (math-equivalent answers grouped; thinktime.voting)
    best-of-N    the chain the scorer rates highest (ties: the first sampled), as `-s best-of-n` picks
    weighted@N   scores summed per answer, the heaviest answer (best-of-n's select=weighted)
    pass@N       some chain is right: the ceiling of any rule

Every rule is paired with maj@N problem by problem: the problems one gets right and the other not, and the exact
two-sided sign test on them. Search runs (e.g. PRM-guided beam: `thinktime eval -s beam --option scorer=prm:PATH`)
on the same problems join as rules of their own, paired with maj@N at the largest N.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thinktime.errors import BadInputError
from thinktime.evaluation.metrics import wilson


@dataclass
class Rule:
    """One selection rule at one N: which problems it gets right, and the tokens per problem it costs."""
    name: str
    n: int
    correct: list[bool]
    tokens: float
    against: dict = field(default_factory=dict)  # vs maj@N: wins, losses, sign_test_p

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(sum(self.correct), len(self.correct))

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return {"rule": self.name, "n": self.n, "problems": len(self.correct), "correct": sum(self.correct),
                "accuracy": self.accuracy, "ci": [round(lo, 4), round(hi, 4)], "tokens": round(self.tokens, 1),
                **({"vs_majority": self.against} if self.against else {})}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on the discordant pairs."""
    k, m = min(wins, losses), wins + losses
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)


def paired(rule: list[bool], majority: list[bool]) -> dict:
    wins = sum(a and not b for a, b in zip(rule, majority))
    losses = sum(b and not a for a, b in zip(rule, majority))
    return {"wins": wins, "losses": losses, "sign_test_p": round(sign_test(wins, losses), 4)}


def check_run(records: list[dict], ns: list[int]) -> None:
    """The run must have voted at each N and kept the chains' texts."""
    for record in records:
        missing = [n for n in ns if str(n) not in record.get("by_k", {})]
        if missing:
            voted = ", ".join(sorted(record.get("by_k", {}), key=int))
            raise BadInputError(f"problem {record['id']} was not voted at N={missing[0]} (the run voted at {voted})",
                                hint="ask for N among those, or eval self-consistency with that -n")
        if len(record.get("candidates", [])) < max(ns) or any("text" not in c for c in record["candidates"]):
            raise BadInputError(f"problem {record['id']} lacks {max(ns)} chains with their texts",
                                hint="eval self-consistency with --save-text (the default) and -n up to the N asked")


def score_chains(records: list[dict], scorer, how: str, n: int,
                 on_record: Callable[[], None] | None = None) -> list[list[float]]:
    """The scorer's score of each of the first `n` chains of each problem, steps split as best-of-n splits them."""
    from thinktime.scorers import aggregate
    from thinktime.strategies.steps import DEFAULT_DELIMITER, split_steps

    scores = []
    for record in records:
        chains = [split_steps(c["text"], DEFAULT_DELIMITER) or [c["text"]] for c in record["candidates"][:n]]
        steps = scorer.score(record["question"], chains)
        scores.append([aggregate(s, how) if scorer.per_step else float(s[-1]) for s in steps])
        if on_record:
            on_record()
    return scores


def selections(records: list[dict], scores: list[list[float]], n: int) -> dict[str, list[bool]]:
    """Per problem, whether each rule's pick among the first `n` chains is right."""
    from thinktime.voting import group_answers

    picked: dict[str, list[bool]] = {"maj": [], "best": [], "weighted": [], "pass": [], "first": []}
    for record, chain_scores in zip(records, scores):
        candidates, chain_scores = record["candidates"][:n], chain_scores[:n]
        best = max(range(len(candidates)), key=lambda i: (chain_scores[i], -i))
        groups = group_answers([c["answer"] for c in candidates], chain_scores)
        heaviest = max(groups[0].members, key=lambda i: (chain_scores[i], -i)) if groups else None
        picked["maj"].append(bool(record["by_k"][str(n)]["correct"]))
        picked["best"].append(bool(candidates[best]["correct"]))
        picked["weighted"].append(heaviest is not None and bool(candidates[heaviest]["correct"]))
        picked["pass"].append(any(c["correct"] for c in candidates))
        picked["first"].append(bool(candidates and candidates[0]["correct"]))
    return picked


def separation(records: list[dict], scores: list[list[float]], n: int) -> dict:
    """How well the scores tell right chains from wrong ones over the first `n` of every problem: AUROC (the chance
    that a right chain outscores a wrong one, ties half; 0.5 is chance) and each side's mean score."""
    right = [s for r, chain in zip(records, scores) for c, s in zip(r["candidates"][:n], chain[:n]) if c["correct"]]
    wrong = [s for r, chain in zip(records, scores) for c, s in zip(r["candidates"][:n], chain[:n]) if not c["correct"]]
    if not right or not wrong:
        return {"right": len(right), "wrong": len(wrong), "auroc": None}
    ranked = sorted(wrong)
    wins = sum(bisect.bisect_left(ranked, x) + 0.5 * (bisect.bisect_right(ranked, x) - bisect.bisect_left(ranked, x))
               for x in right)
    return {"right": len(right), "wrong": len(wrong), "auroc": round(wins / (len(right) * len(wrong)), 4),
            "right_mean": round(sum(right) / len(right), 4), "wrong_mean": round(sum(wrong) / len(wrong), 4)}


def compare_rules(records: list[dict], scored: dict[str, list[list[float]]], ns: list[int]) -> list[Rule]:
    """maj@N and pass@N at each N, and each scorer's best-of-N and weighted@N paired with maj@N."""
    rules = []
    for n in ns:
        tokens = sum(r["by_k"][str(n)]["tokens"] for r in records) / len(records)
        majority = [bool(r["by_k"][str(n)]["correct"]) for r in records]
        rules.append(Rule(f"maj@{n}", n, majority, tokens))
        judged = scored.items() if n > 1 else ()  # one chain: every rule picks it
        for name, scores in judged:
            picked = selections(records, scores, n)
            rules.append(Rule(f"best-of-{n} ({name})", n, picked["best"], tokens, paired(picked["best"], majority)))
            rules.append(Rule(f"weighted@{n} ({name})", n, picked["weighted"], tokens,
                              paired(picked["weighted"], majority)))
        rules.append(Rule(f"pass@{n}", n, [any(c["correct"] for c in r["candidates"][:n]) for r in records], tokens))
    return rules


def search_rules(folder: Path, records: list[dict], majority: list[bool]) -> list[Rule]:
    """An eval run's points on the same problems, each paired with `majority` (maj@N at the largest N)."""
    from thinktime.evaluation.report import summarize
    from thinktime.evaluation.store import read_records

    summary = summarize(folder)
    theirs = {r["id"]: r for r in read_records(folder)}
    ids = [r["id"] for r in records]
    if set(theirs) != set(ids):
        raise BadInputError(f"{folder} covers {len(theirs)} problems, the sampled run {len(ids)}, not the same set",
                            hint="eval the search on the same dataset, split and --limit")
    rules = []
    for point in summary.points:
        correct = [bool(theirs[i]["by_k"][str(point.k)]["correct"]) for i in ids]
        tokens = sum(theirs[i]["by_k"][str(point.k)]["tokens"] for i in ids) / len(ids)
        label = summary.config.get("strategy", "?") + (f" {point.label}" if len(summary.points) > 1 else "")
        rules.append(Rule(f"{label} ({folder.name})", point.k, correct, tokens, paired(correct, majority)))
    return rules
