"""What every strategy shares: turning completions into candidates and results."""
from __future__ import annotations

import time

from thinktime.answers import extract_answer
from thinktime.reasoning import split_reasoning
from thinktime.run_context import Context
from thinktime.types import Candidate, Completion, Result, Usage


def to_candidate(completion: Completion) -> Candidate:
    extraction = extract_answer(split_reasoning(completion.text).answer or completion.text)
    if extraction.value is None:  # nothing in the closing statement: look at the whole chain
        extraction = extract_answer(completion.text)
    return Candidate(completion.text, extraction.value, extraction.method, completion.finish_reason,
                     completion.usage)


def make_result(ctx: Context, chosen: Candidate, strategy: str, candidates: list[Candidate],
                usage: Usage, details: dict | None = None) -> Result:
    split = split_reasoning(chosen.text)
    return Result(
        question=ctx.question,
        answer=chosen.answer,
        answer_method=chosen.answer_method,
        reasoning=split.reasoning,
        content=split.answer,
        text=chosen.text,
        finish_reason=chosen.finish_reason,
        usage=usage,
        seconds=time.perf_counter() - ctx.started,
        strategy=strategy,
        model=ctx.engine.model_name,
        candidates=candidates,
        details={"stop_reason": _stop_reason(ctx), **(details or {})},
    )


def _stop_reason(ctx: Context) -> str:
    """Why a run stopped, for strategies that give no reason of their own (cot, a finished best-of-n)."""
    if ctx.cancel.is_set():
        return "cancelled"
    return "budget exhausted" if ctx.budget.exhausted else "finished"
