"""cot: one chain of thought, streamed as it is generated (as the InternLM3 deep-thinking tutorial runs it)."""
from __future__ import annotations

from thinktime.run_context import Context
from thinktime.strategies.base import make_result, to_candidate
from thinktime.types import Event, Result

NAME = "cot"


def run(ctx: Context) -> Result:
    params = ctx.sampling(n=1, max_new_tokens=ctx.budget.cap(ctx.params.max_new_tokens))
    completion = None
    ctx.emit(Event("candidate_started", 0))
    for delta in ctx.engine.stream(ctx.prompt, params, ctx.cancel):
        if delta.text:
            ctx.emit(Event("delta", delta.index, delta.text))
        if delta.completion is not None:
            completion = delta.completion
    assert completion is not None, "engine.stream ended without a completion"
    ctx.budget.charge([completion], completion.prompt_tokens)
    candidate = to_candidate(completion)
    ctx.emit(Event("candidate_finished", 0, data={"answer": candidate.answer}))
    return make_result(ctx, candidate, NAME, [candidate], ctx.budget.used)
