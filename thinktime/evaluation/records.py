"""The pieces of an eval record that every path writes: a problem's fields, a graded chain, a problem's seed."""
from __future__ import annotations

import hashlib
from typing import Any

from thinktime.evaluation.datasets import Problem
from thinktime.evaluation.grading import Verdict


def problem_seed(seed: int, problem_id: str) -> int:
    """Each problem's own sampling seed, so a resumed run draws what an unbroken one would."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def candidate_record(candidate, verdict: Verdict, save_text: bool) -> dict[str, Any]:
    record = {"answer": candidate.answer, "method": candidate.answer_method,
              "tokens": candidate.usage.completion_tokens, "finish": candidate.finish_reason,
              "correct": verdict.correct, "simple": verdict.simple}
    if save_text:
        record["text"] = candidate.text
    return record


def base_record(problem: Problem) -> dict[str, Any]:
    return {"id": problem.id, "question": problem.question, "gold": problem.gold, **({"meta": problem.meta}
                                                                                     if problem.meta else {})}
