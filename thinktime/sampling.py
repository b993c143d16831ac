"""Engine calls as strategies and scorers make them: capped by the budget, charged to it, seeded, cancellable."""
from __future__ import annotations

from collections.abc import Sequence

from thinktime.run_context import Context
from thinktime.types import Candidate, Completion, Event, Prompt, Usage

# Sampling N chains at temperature 0 would give N copies of one chain: multi-sample strategies
# sample at this temperature unless the caller chose one above 0.
DEFAULT_SAMPLING_TEMPERATURE = 0.7


def sampling_temperature(ctx: Context) -> float:
    return ctx.params.temperature if ctx.params.temperature > 0 else DEFAULT_SAMPLING_TEMPERATURE


def seed_for(ctx: Context, call: int) -> int | None:
    """A distinct, reproducible seed for each engine call of a run (None stays unseeded)."""
    # within int64 (what torch's and vLLM's generators take), whatever seed the caller gave
    return None if ctx.params.seed is None else (ctx.params.seed + 1009 * call) % 2**63


def generate(ctx: Context, prompts: Sequence[Prompt], n: int, max_new_tokens: int, *, call: int = 0,
             temperature: float | None = None, stop: Sequence[str] = (), **extra) -> list[list[Completion]] | None:
    """`n` completions per prompt in one engine call, or None when the budget or a cancel leaves no room.

    Each sample gets an equal share of what is left of the budget, so the call can never overrun it. `extra`:
    further SamplingParams fields (logprobs, stop_below).
    """
    if ctx.cancel.is_set() or not prompts:
        return None
    cap = ctx.budget.cap(max_new_tokens, n * len(prompts))
    if cap < 1:
        return None
    temperature = ctx.params.temperature if temperature is None else temperature
    params = ctx.sampling(n=n, max_new_tokens=cap, temperature=temperature, stop=tuple(stop),
                          seed=seed_for(ctx, call), **extra)
    out = ctx.engine.generate(list(prompts), params, ctx.cancel)
    # The prompt is processed once per prompt, however many samples it gets.
    ctx.budget.charge([c for row in out for c in row], sum(row[0].prompt_tokens for row in out if row))
    return out


def stream_one(ctx: Context, prompt: Prompt, max_new_tokens: int, *, index: int = 0, call: int = 0,
               stop: Sequence[str] = ()) -> Completion | None:
    """One completion, its text emitted as "delta" events while it is generated; None when out of budget."""
    if ctx.cancel.is_set():
        return None
    cap = ctx.budget.cap(max_new_tokens)
    if cap < 1:
        return None
    params = ctx.sampling(n=1, max_new_tokens=cap, stop=tuple(stop), seed=seed_for(ctx, call))
    completion = None
    for delta in ctx.engine.stream(prompt, params, ctx.cancel):
        if delta.text:
            ctx.emit(Event("delta", index, delta.text))
        if delta.completion is not None:
            completion = delta.completion
    assert completion is not None, "engine.stream ended without a completion"
    ctx.budget.charge([completion], completion.prompt_tokens)
    return completion


def context_room(ctx: Context, prompt: Prompt) -> int | None:
    """Tokens the engine's context window has left after `prompt`; None where the engine does not say."""
    limit = getattr(ctx.engine, "context_length", None)
    if not limit:
        return None
    return limit - ctx.engine.count_tokens(ctx.engine.render(prompt))


def nothing_generated() -> Candidate:
    """The stand-in chosen candidate when the budget allowed no chain at all."""
    return Candidate("", None, None, "length", Usage())
