"""cot: one chain of thought, streamed as it is generated (as the InternLM3 deep-thinking tutorial runs it).

Many questions at once take one path too (generate_batch): Thinker.solve_many and eval's n-list sampling call
it, and the server sizes its cot requests with chain_params before its scheduler batches them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from thinktime.run_context import Context
from thinktime.strategies.base import make_result, to_candidate
from thinktime.types import Completion, Event, Result, SamplingParams

NAME = "cot"


def chain_params(ctx: Context, n: int = 1) -> SamplingParams:
    """n chains of the context's sampling settings, each capped so that all n fit the budget."""
    return ctx.sampling(n=n, max_new_tokens=ctx.budget.cap(ctx.params.max_new_tokens, n))


def run(ctx: Context) -> Result:
    params = chain_params(ctx)
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


def generate_batch(contexts: Sequence[Context], n: int = 1,
                   seeds: Sequence[int] | None = None) -> list[list[Completion]] | None:
    """n chains for each context in one engine call (the first context's engine and settings), each budget
    charged; None where a budget leaves no room for the n chains.

    One call has one max_new_tokens: the tightest budget caps it, as run() caps one question's. Seeded, each
    prompt draws from its own seed (`seeds`, else the settings' seed for every prompt), so what it draws does not
    depend on which prompts share the call."""
    if not contexts:
        return []
    params = contexts[0].params
    params = replace(params, n=n, max_new_tokens=min(c.budget.cap(params.max_new_tokens, n) for c in contexts))
    if params.max_new_tokens < 1:
        return None
    if seeds is None and params.seed is not None:
        seeds = (params.seed,) * len(contexts)
    if seeds is not None:
        params = replace(params, seed=None, seeds=tuple(seeds))
    outputs = contexts[0].engine.generate([c.prompt for c in contexts], params)
    for ctx, completions in zip(contexts, outputs):
        ctx.budget.charge(completions, completions[0].prompt_tokens if completions else 0)
    return outputs
