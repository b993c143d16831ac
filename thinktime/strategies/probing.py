"""Probing chains for their answer as they think (Dynasor-CoT, Fu et al. 2024): stop a chain once it has made up
its mind.

Chains are generated `every` tokens at a time (each piece continues the chain as a prefix, so engines with a
prefix cache prefill only what is new). After each piece every live chain is asked for its answer so far: a
short greedy continuation of the chain followed by "the final answer is \\boxed{". A chain whose last
`agree` probes give the same answer stops there, with that probe as its closing statement; the others go on
until they end or reach their token limit. Probe tokens are generated tokens too: they count against the
budget and in the chain's usage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from thinktime.answers import equivalent, extract_answer
from thinktime.run_context import Context
from thinktime.sampling import generate
from thinktime.types import Completion, Prompt

PROBES = {"en": "\n\nSo the final answer is \\boxed{", "zh": "\n\n所以最终答案是 \\boxed{"}
PROBE_TOKENS = 12  # enough for an answer and its closing brace


@dataclass
class _Chain:
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    answers: list[str | None] = field(default_factory=list)
    done: Completion | None = None


def probed_chains(ctx: Context, k: int, max_new: int, *, every: int, agree: int, call: int,
                  temperature: float) -> tuple[list[Completion] | None, int]:
    """`k` chains, each stopped early once `agree` successive probes agree; None when out of budget. Also returns
    the number of engine calls made (for distinct seeds)."""
    chains = [_Chain() for _ in range(k)]
    out = generate(ctx, [ctx.prompt], k, min(every, max_new), call=call, temperature=temperature)
    calls = 1
    if out is None:
        return None, calls
    pieces = out[0]
    while True:
        live = _extend([c for c in chains if c.done is None], pieces, max_new)
        if not live or ctx.cancel.is_set():
            break
        probes = generate(ctx, [_prompt(ctx, c.text + PROBES[_lang(ctx)]) for c in live], 1, PROBE_TOKENS,
                          call=call + calls, temperature=0.0, stop=("}",))
        calls += 1
        if probes is None:
            break
        for chain, (probe,) in zip(live, probes):
            _judge(ctx, chain, probe, agree)
        live = [c for c in live if c.done is None]
        if not live:
            break
        room = min(every, max_new - max(c.tokens for c in live))
        more = generate(ctx, [_prompt(ctx, c.text) for c in live], 1, max(1, room), call=call + calls,
                        temperature=temperature)
        calls += 1
        if more is None:
            break
        pieces = [row[0] for row in more]
    for chain in chains:  # out of budget or cancelled: what each chain has so far
        if chain.done is None:
            chain.done = Completion(chain.text, "cancelled" if ctx.cancel.is_set() else "length",
                                    chain.prompt_tokens, chain.tokens)
    return [c.done for c in chains], calls


def _extend(live: list[_Chain], pieces: list[Completion], max_new: int) -> list[_Chain]:
    """Each live chain takes its new piece; those that ended (or reached `max_new`) are done. The rest."""
    still = []
    for chain, piece in zip(live, pieces):
        chain.text += piece.text
        chain.tokens += piece.completion_tokens
        chain.prompt_tokens = chain.prompt_tokens or piece.prompt_tokens
        if piece.finish_reason != "length" or chain.tokens >= max_new:
            chain.done = Completion(chain.text, piece.finish_reason, chain.prompt_tokens, chain.tokens,
                                    ended_turn=piece.ended_turn)
        else:
            still.append(chain)
    return still


def _judge(ctx: Context, chain: _Chain, probe: Completion, agree: int) -> None:
    """Record the probe's answer; `agree` alike in a row end the chain with the probe as its closing statement."""
    closed = PROBES[_lang(ctx)] + probe.text + "}"
    answer = extract_answer(closed).value
    chain.answers.append(answer)
    recent = chain.answers[-agree:]
    if len(recent) == agree and recent[0] is not None and all(equivalent(recent[0], a) for a in recent[1:]):
        chain.done = Completion(chain.text + closed, "stop", chain.prompt_tokens,
                                chain.tokens + probe.completion_tokens)


def _prompt(ctx: Context, prefix: str) -> Prompt:
    return Prompt(ctx.prompt.messages, ctx.prompt.prefix + prefix)


def _lang(ctx: Context) -> str:
    return "zh" if ctx.language == "zh" else "en"
