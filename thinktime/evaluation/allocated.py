"""`thinktime eval -s allocation`: per-question allocation over the problems of a batch.

Each batch of `--batch-problems` problems (default BATCH) shares one budget of `tokens` times their number
(`-n` sets `tokens`, the average per problem; strategies/allocation.py spends it where votes are least
settled). Batches are cut from the dataset in its order, so a resumed run forms the batches an unbroken one
would; a batch's records are written together once it is done (a killed batch is redone; a batch found partly
written runs its missing problems as a batch of their own).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from thinktime.evaluation.datasets import Dataset, Problem
from thinktime.evaluation.grading import grade
from thinktime.evaluation.records import base_record, candidate_record, problem_seed
from thinktime.evaluation.store import RunStore

BATCH = 20  # problems that share one budget by default: enough for hard and easy ones to trade tokens


def run_allocated(thinker, dataset: Dataset, store: RunStore, settings,
                  on_record: Callable[[dict], None] | None = None) -> None:
    """Every batch of the dataset with a problem not yet in `store`, its records appended as it finishes."""
    size = settings.batch_problems or BATCH
    problems = dataset.problems
    for start in range(0, len(problems), size):
        batch = [p for p in problems[start : start + size] if p.id not in store.done]
        if not batch:
            continue
        for record in allocated_records(thinker, batch, settings):
            store.append(record)
            if on_record:
                on_record(record)


def allocated_records(thinker, batch: list[Problem], settings) -> list[dict]:
    """One record per problem: for each -n value (tokens per problem), the batch solved under that budget."""
    from thinktime.strategies.allocation import solve_batch

    records = [{**base_record(p), "by_k": {}, "candidates": [], "prompt_tokens": 0, "completion_tokens": 0,
                "seconds": 0.0, "batch": len(batch)} for p in batch]
    for k in settings.ns:
        contexts = [thinker.context(p.question, strategy=settings.strategy, options=settings.strategy_options(k),
                                    seed=problem_seed(settings.seed, p.id)) for p in batch]
        started = time.perf_counter()
        results = solve_batch(contexts, settings.strategy_options(k))
        spent = time.perf_counter() - started
        batch_tokens = sum(r.usage.completion_tokens for r in results) or 1
        for problem, result, record in zip(batch, results, records):
            verdict = grade(result.answer, problem.gold)
            tokens = result.usage.completion_tokens
            seconds = spent * tokens / batch_tokens  # one run served the batch: each its share of the time
            record["by_k"][str(k)] = {"answer": result.answer, "correct": verdict.correct, "simple": verdict.simple,
                                      "tokens": tokens, "seconds": round(seconds, 4),
                                      "candidates": len(result.candidates), "rounds": result.details["rounds"],
                                      "batch_tokens": result.details["allocation"]["spent"]}
            record["prompt_tokens"] += result.usage.prompt_tokens
            record["completion_tokens"] += tokens
            record["seconds"] = round(record["seconds"] + seconds, 4)
            if k == settings.max_n:
                record["candidates"] = [candidate_record(c, grade(c.answer, problem.gold), settings.save_text)
                                        for c in result.candidates]
    for record in records:
        top = record["by_k"][str(settings.max_n)]
        record.update(chosen=top["answer"], correct=top["correct"], simple=top["simple"])
    return records
