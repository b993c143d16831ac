"""A scorer's step-level F1 against rollout labels, as ProcessBench measures it.

Each labelled chain has a reference: the index of its first step labelled wrong, or -1 (none). The scorer
predicts the first step whose score falls below `threshold` (-1: none). Accuracy is taken apart on the
erroneous chains (reference >= 0: the prediction must name that step) and the correct ones (reference -1:
the prediction must be -1); F1 is their harmonic mean.

A per-step scorer (a PRM) scores each chain once; an outcome scorer (ORM, the model judging itself) scores
every prefix of the chain as a partial solution, all of a question's prefixes in one call.
"""
from __future__ import annotations

from collections.abc import Callable

from thinktime.labels.agreement import first_wrong
from thinktime.scorers.base import Scorer


def predicted_first_wrong(scores: list[float], threshold: float) -> int:
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def processbench_f1(references: list[int], predictions: list[int]) -> dict:
    erroneous = [(r, p) for r, p in zip(references, predictions) if r >= 0]
    correct = [(r, p) for r, p in zip(references, predictions) if r < 0]
    acc_err = sum(r == p for r, p in erroneous) / len(erroneous) if erroneous else None
    acc_ok = sum(p < 0 for _, p in correct) / len(correct) if correct else None
    if acc_err is None or acc_ok is None:
        f1 = None  # one kind of chain is missing: no harmonic mean to take
    else:
        f1 = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"erroneous": len(erroneous), "erroneous_accuracy": acc_err, "correct": len(correct),
            "correct_accuracy": acc_ok, "f1": f1}


def step_scores(scorer: Scorer, question: str, chains: list[list[str]]) -> list[list[float]]:
    """A score per step of each chain."""
    if scorer.per_step:
        return [list(s) for s in scorer.score(question, chains)]
    prefixes = [steps[:i + 1] for steps in chains for i in range(len(steps))]
    flat = [s[-1] for s in scorer.score(question, prefixes)] if prefixes else []
    out, at = [], 0
    for steps in chains:
        out.append(flat[at:at + len(steps)])
        at += len(steps)
    return out


def evaluate_scorer(rows: list[dict], scorer_for: Callable[[str], Scorer], threshold: float = 0.5,
                    on_question: Callable[[int], None] | None = None) -> dict:
    """ProcessBench F1 of the scorer over the rows with steps; `scorer_for(question)` gives the scorer to use."""
    questions: dict[str, list[dict]] = {}
    for row in rows:
        if row["completions"]:
            questions.setdefault(row["prompt"], []).append(row)
    references, predictions = [], []
    for question, group in questions.items():
        scores = step_scores(scorer_for(question), question, [r["completions"] for r in group])
        for row, chain_scores in zip(group, scores):
            references.append(first_wrong(row["labels"]))
            predictions.append(predicted_first_wrong(chain_scores, threshold))
        if on_question:
            on_question(len(group))
    return {**processbench_f1(references, predictions), "threshold": threshold,
            "references": references, "predictions": predictions}
