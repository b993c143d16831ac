"""budget: budget forcing as in s1 (Muennighoff et al., 2025): control how long the model thinks.

- Minimum: when the model ends its thinking before `min_tokens`, the end is replaced by "Wait"
  (or the question language's equivalent, "等等") and the chain continues from there, at most
  `max_waits` times. The end is the `</think>` tag for models that think in tags, else the end of
  the turn.
- Maximum: when the thinking reaches `max_tokens`, it is cut, the thinking is closed, and the
  model is asked for the final answer with a forced "Final answer: \\boxed{" (at most
  `answer_tokens` more tokens).
The chain continues through `Prompt.prefix`, so on the transformers engine the KV cache of the
chain so far is reused instead of prefilled again.
"""
from __future__ import annotations

from thinktime.reasoning import THINK_CLOSE
from thinktime.run_context import Context
from thinktime.sampling import context_room, nothing_generated, stream_one
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.options import Option, positive, read_options
from thinktime.types import Completion, Event, Prompt, Result

NAME = "budget"
WAIT = {"en": "Wait", "zh": "等等"}
FINAL_ANSWER = {"en": "Final answer: \\boxed{", "zh": "最终答案：\\boxed{"}
OPTIONS = {
    "min_tokens": Option(0, "thinking tokens to reach before an end is accepted", int, lambda v: v >= 0),
    "max_tokens": Option(None, "thinking tokens at most, then cut and ask for the answer (default: max_new_tokens)",
                         int, positive),
    "max_waits": Option(4, "how many times an early end may be replaced by Wait", int, lambda v: v >= 0),
    "wait": Option(None, "the word that replaces an early end (default: Wait, or 等等 for Chinese)", str),
    "answer_tokens": Option(64, "tokens for the final answer after a cut or after closing </think>", int, positive),
    "think_tags": Option(None, "the model thinks in <think> tags (default: from the model's alias)", bool),
}


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    wait = opts["wait"] or WAIT[ctx.language]
    think_tags = opts["think_tags"]
    if think_tags is None:
        think_tags = bool(getattr(getattr(ctx.engine, "spec", None), "think_tags", False))
    limit = opts["max_tokens"] or ctx.params.max_new_tokens
    chain = _Chain(ctx)
    ctx.emit(Event("candidate_started", 0))
    outcome, thought, waits = _think(ctx, chain, opts, wait, limit, think_tags)
    outcome, forced = _answer(ctx, chain, opts, outcome, thought, think_tags)
    if not chain.pieces:
        return make_result(ctx, nothing_generated(), NAME, [], ctx.budget.used,
                           {"stop_reason": "cancelled" if ctx.cancel.is_set() else "budget exhausted"})
    pieces = chain.pieces
    whole = Completion(chain.text, pieces[-1].finish_reason, sum(p.prompt_tokens for p in pieces),
                       sum(p.completion_tokens for p in pieces))
    candidate = to_candidate(whole)
    ctx.emit(Event("candidate_finished", 0, data={"answer": candidate.answer, "tokens": whole.completion_tokens}))
    reason = "cancelled" if ctx.cancel.is_set() else {
        "cut": "thinking cut (max_tokens or the budget), answer forced", "ended": "the model ended its thinking",
        "full": "the context window is full", "cancelled": "cancelled"}[outcome]
    details = {"stop_reason": reason, "thinking_tokens": thought, "waits": waits, "forced_answer": forced,
               "calls": len(pieces), "min_tokens": opts["min_tokens"], "max_tokens": limit}
    return make_result(ctx, candidate, NAME, [candidate], ctx.budget.used, details)


class _Chain:
    """The one chain: its text so far (the model's and what thinktime wrote in), its pieces, its engine calls."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.pieces: list[Completion] = []
        self.text = ""
        self.call = 0

    def add(self, inserted: str) -> None:  # text thinktime writes into the chain is streamed like the model's
        self.text += inserted
        self.ctx.emit(Event("delta", 0, inserted))

    def room_after(self, more: str) -> int | None:
        return context_room(self.ctx, Prompt(self.ctx.prompt.messages, self.ctx.prompt.prefix + self.text + more))

    def continue_(self, max_new: int, stop_at=()) -> Completion | None:
        """The chain's next piece; None when out of budget, cancelled, or the context window is full."""
        ctx = self.ctx
        prompt = Prompt(ctx.prompt.messages, ctx.prompt.prefix + self.text)
        room = context_room(ctx, prompt)
        if room is not None and room < 1:
            if not self.pieces:  # the question alone fills the window: the engine says so, as for every strategy
                room = None
            else:
                return None
        completion = stream_one(ctx, prompt, max_new if room is None else min(max_new, room), call=self.call,
                                stop=stop_at)
        self.call += 1
        if completion is not None:
            self.pieces.append(completion)
            self.text += completion.text
        return completion


def _think(ctx: Context, chain: _Chain, opts: dict, wait: str, limit: int, think_tags: bool) -> tuple[str, int, int]:
    """Thinks up to `limit` tokens, an early end replaced by `wait`: (outcome, thinking tokens, waits)."""
    stop = (THINK_CLOSE,) if think_tags else ()
    thought, waits = 0, 0
    while True:
        room = limit - thought
        if ctx.budget.remaining is not None:  # keep room for the final answer
            room = min(room, ctx.budget.remaining - opts["answer_tokens"])
        if room < 1:
            return "cut", thought, waits
        piece = chain.continue_(room, stop)
        if piece is None:
            return "cut", thought, waits
        thought += piece.completion_tokens
        if piece.finish_reason == "cancelled":
            return "cancelled", thought, waits
        if piece.finish_reason == "length":
            # short of what was asked: the engine stopped it at its context window
            return ("full" if piece.completion_tokens < room else "cut"), thought, waits
        if thought < opts["min_tokens"] and waits < opts["max_waits"]:
            waits += 1
            chain.add(("" if chain.text.endswith(("\n", " ")) or not chain.text else " ") + wait)
            ctx.emit(Event("progress", data={"waits": waits, "thinking_tokens": thought}))
            continue
        return "ended", thought, waits


def _answer(ctx: Context, chain: _Chain, opts: dict, outcome: str, thought: int, think_tags: bool) -> tuple[str, bool]:
    """The answer after the thinking: forced after a cut, let run after a closed </think>: (outcome, forced)."""
    if outcome == "cut" and not ctx.cancel.is_set():
        closing = ("\n" + THINK_CLOSE if think_tags else "") + "\n\n" + FINAL_ANSWER[ctx.language]
        room = chain.room_after(closing)
        if room is not None and room < 1:
            return "full", False  # not even the forced answer fits: the chain stays as it was
        chain.add(closing)
        return outcome, chain.continue_(opts["answer_tokens"]) is not None
    if outcome == "ended" and think_tags and chain.pieces and chain.pieces[-1].finish_reason == "stop":
        chain.add(THINK_CLOSE + "\n\n")  # the model closed its thinking: let it write its answer, as long as it is
        # (an R1-style summary runs to hundreds of tokens before its box); answer_tokens bounds forced answers only
        chain.continue_(max(opts["answer_tokens"], ctx.params.max_new_tokens - thought))
    return outcome, False
