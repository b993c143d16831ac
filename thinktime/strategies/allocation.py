"""allocation: one token budget for many questions, spent where it can change an answer (compute-optimal
scaling, Snell et al. 2024: easy questions settle with a few samples, hard ones need many).

Every question first gets a cheap round of chains, all questions in one engine call. Then, round after
round, the questions whose vote is least settled (the smallest lead of the leading answer over the
runner-up, in votes), and only those, get another round, batched in one call, while the budget lasts
and until a question has `most` chains or its leader can no longer be overtaken: as a greedy that
gives each next chain to the least settled question would, so a question that leans one way waits
until the split ones lean too. Each question's answer is its self-consistency vote (thinktime.voting)
over the chains it got.

As a registry strategy (`allocation`, `tokens` its size) it serves one question with `tokens`; `thinktime eval`
gives each batch of problems `tokens` times their number (evaluation/runner.py), as Thinker.solve_allocated does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from thinktime.errors import BadInputError
from thinktime.run_context import Context
from thinktime.sampling import sampling_temperature
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.options import Option, positive, read_options
from thinktime.strategies.self_consistency import TIE_RULE, choose, vote_table
from thinktime.types import Candidate, Result
from thinktime.voting import group_answers, vote_answers


NAME = "allocation"
OPTIONS = {
    "tokens": Option(2000, "generated tokens per question (over a batch: this times the number of questions)", int,
                     positive),
    "first": Option(4, "chains every question gets in the first round", int, positive),
    "step": Option(4, "chains per later round, to the questions whose vote is least settled", int, positive),
    "most": Option(16, "the most chains one question gets", int, positive),
}


def run(ctx: Context) -> Result:
    """One question on its own: self-consistency that stops once its leader cannot be overtaken, within `tokens`
    (and within the run's budget)."""
    opts = read_options(NAME, OPTIONS, ctx.options)
    room = opts["tokens"] if ctx.budget.remaining is None else min(opts["tokens"], ctx.budget.remaining)
    if room < 1:
        return _result(Question(ctx), 0, 0, opts["most"])
    return solve_batch([ctx], {**opts, "tokens": room})[0]


def solve_batch(contexts: Sequence[Context], options: dict) -> list[Result]:
    """Questions that share one budget of `tokens` each on average, under this strategy's options."""
    opts = read_options(NAME, OPTIONS, options)
    return solve_allocated(contexts, opts["tokens"] * len(contexts), first=opts["first"], step=opts["step"],
                           most=opts["most"])


@dataclass
class Question:
    ctx: Context
    candidates: list[Candidate] = field(default_factory=list)
    rounds: int = 0

    def lead(self) -> int:
        """Votes between the leading answer and the runner-up (0 while nothing has an answer)."""
        counts = sorted((len(g.members) for g in group_answers(vote_answers(self.candidates))), reverse=True)
        return (counts[0] - (counts[1] if len(counts) > 1 else 0)) if counts else 0

    def settled(self, most: int) -> bool:
        return len(self.candidates) >= most or self.lead() > most - len(self.candidates)


def solve_allocated(contexts: Sequence[Context], total_tokens: int, *, first: int = 4, step: int = 4,
                    most: int = 16) -> list[Result]:
    """Self-consistency for every question under one budget of `total_tokens` generated tokens in all."""
    if total_tokens < 1 or not 1 <= first <= most or step < 1:
        raise BadInputError("allocation needs a positive token budget and 1 <= first <= most, step >= 1",
                            hint="e.g. total_tokens=20000, first=4, step=4, most=16")
    questions = [Question(ctx) for ctx in contexts]
    spent = 0
    chosen = list(questions)
    size = first
    while chosen:
        per_chain = _chain_tokens(questions, contexts[0].params.max_new_tokens)
        room = (total_tokens - spent) // max(1, per_chain * size)
        chosen = chosen[:room]
        if not chosen:
            break
        drawn = sum(len(q.candidates) for q in chosen)
        spent += _draw(chosen, size, total_tokens - spent)
        if sum(len(q.candidates) for q in chosen) == drawn:
            break  # the engine returned nothing (cancelled): another round would not either
        size = step
        open_ = sorted((q for q in questions if not q.settled(most)), key=lambda q: (q.lead(), len(q.candidates)))
        chosen = [q for q in open_ if q.lead() == open_[0].lead()]  # the least settled only, as a greedy would
    return [_result(q, spent, total_tokens, most) for q in questions]


def _chain_tokens(questions: list[Question], cap: int) -> int:
    """Tokens a chain is expected to take: the mean so far, the token cap before any chain ran."""
    lengths = [c.usage.completion_tokens for q in questions for c in q.candidates]
    return max(1, round(sum(lengths) / len(lengths))) if lengths else cap


def _draw(chosen: list[Question], size: int, left: int) -> int:
    """One round of `size` chains for each chosen question, in one engine call; the tokens it took."""
    ctx = chosen[0].ctx
    cap = max(1, min(ctx.params.max_new_tokens, left // (size * len(chosen))))
    seeds = None if ctx.params.seed is None else tuple(
        (q.ctx.params.seed + 7919 * q.rounds) % 2**63 for q in chosen)  # each question's rounds draw afresh
    params = replace(ctx.params, n=size, max_new_tokens=cap, temperature=sampling_temperature(ctx), seed=None,
                     seeds=seeds)
    out = ctx.engine.generate([q.ctx.prompt for q in chosen], params, ctx.cancel)
    taken = 0
    for question, row in zip(chosen, out):
        question.ctx.budget.charge(row, row[0].prompt_tokens if row else 0)
        question.candidates += [to_candidate(c) for c in row]
        question.rounds += 1
        taken += sum(c.completion_tokens for c in row)
    return taken


def _result(question: Question, spent: int, total: int, most: int) -> Result:
    ctx, candidates = question.ctx, question.candidates
    groups = group_answers(vote_answers(candidates))
    chosen = choose(candidates, groups)
    if len(candidates) >= most:
        reason = f"all {most} chains sampled"
    elif candidates and question.settled(most):
        reason = "decided: the leader cannot be overtaken"
    else:
        reason = "budget exhausted"
    details = {"votes": vote_table(groups), "samples": len(candidates), "rounds": question.rounds,
               "stop_reason": reason,
               "tie_rule": TIE_RULE, "allocation": {"spent": spent, "total_tokens": total}}
    return make_result(ctx, chosen, "self-consistency", candidates, ctx.budget.used, details)
