"""self-consistency (maj@N): sample N chains, vote on their answers compared by math equivalence.

Chains are drawn in one batched engine call, or in rounds of `round` chains when `round` < `n`;
between rounds sampling stops early (adaptive consistency) once the leading answer
- cannot be overtaken: its votes exceed the runner-up's plus every chain still to come, or
- is confident enough: with the Beta stopping rule of Aggarwal et al. (2023), the probability that
  the leader is the majority answer, P(p > 1/2) for p ~ Beta(leader + 1, runner-up + 1), reaches
  `confidence`.
Tie rule (thinktime.voting): among answers with equal votes the one sampled first wins. The vote
distribution is in `result.details["votes"]`; chains without an answer cast no vote, and chains cut short whose
answer is only their last number vote only when no chain gave a real answer (voting.vote_answers).
"""
from __future__ import annotations

from math import comb

from thinktime.strategies.base import Context, make_result, to_candidate
from thinktime.strategies.options import Option, positive, probability, read_options
from thinktime.strategies.sampling import generate, nothing_generated, sampling_temperature
from thinktime.types import Candidate, Event, Result
from thinktime.voting import VoteGroup, group_answers, is_guess, vote_answers

NAME = "self-consistency"
TIE_RULE = "equal votes: the answer sampled first wins"
OPTIONS = {
    "n": Option(8, "the most chains to sample", int, positive),
    "round": Option(None, "chains per engine call; below n, sampling stops once the vote is decided", int, positive),
    "confidence": Option(0.95, "stop early once P(leader is the majority) reaches this; 1 turns it off",
                         float, probability),
}


def leader_probability(leader: int, runner_up: int) -> float:
    """P(p > 1/2) for p ~ Beta(leader + 1, runner_up + 1), exactly: a binomial tail for integer votes."""
    trials = leader + runner_up + 1
    return sum(comb(trials, k) for k in range(leader + 1)) / 2**trials


def stop_reason(groups: list[VoteGroup], remaining: int, confidence: float, guesses: bool = False) -> str | None:
    """Why sampling can stop now, or None to keep sampling. Votes that are only guesses (`guesses`: no chain
    gave a real answer yet) decide nothing: one real answer to come would void them all."""
    if not groups or guesses:
        return None
    leader = int(groups[0].weight)
    runner_up = int(groups[1].weight) if len(groups) > 1 else 0
    if leader > runner_up + remaining:
        return "decided: the leader cannot be overtaken"
    if confidence < 1.0 and leader_probability(leader, runner_up) >= confidence:
        return f"confident: P(leader is the majority) >= {confidence:g}"
    return None


def vote_table(groups: list[VoteGroup]) -> list[dict]:
    return [{"answer": g.answer, "votes": int(g.weight), "members": list(g.members)} for g in groups]


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    n = opts["n"]
    size = min(opts["round"] or n, n)
    candidates: list[Candidate] = []
    groups: list[VoteGroup] = []
    reason = "all chains sampled"
    call = 0
    while len(candidates) < n:
        k = min(size, n - len(candidates))
        first = len(candidates)
        # Each chain's share is what is left over all the chains still to sample, not over this round's:
        # chains are as long in rounds as in one call, and stopping early leaves the rest unspent.
        max_new = ctx.budget.cap(ctx.params.max_new_tokens, n - first)
        if max_new < 1 or ctx.cancel.is_set():
            reason = "cancelled" if ctx.cancel.is_set() else "budget exhausted"
            break
        for i in range(first, first + k):
            ctx.emit(Event("candidate_started", i))
        out = generate(ctx, [ctx.prompt], k, max_new, call=call, temperature=sampling_temperature(ctx))
        call += 1
        if out is None:
            reason = "cancelled" if ctx.cancel.is_set() else "budget exhausted"
            break
        for i, completion in enumerate(out[0], first):
            candidate = to_candidate(completion)
            candidates.append(candidate)
            ctx.emit(Event("candidate_finished", i, data={"answer": candidate.answer,
                                                          "tokens": completion.completion_tokens}))
        answers = vote_answers(candidates)
        groups = group_answers(answers)
        ctx.emit(Event("progress", data={"votes": vote_table(groups), "samples": len(candidates), "n": n}))
        guesses = all(a is None or is_guess(c) for a, c in zip(answers, candidates))
        if len(candidates) < n and (why := stop_reason(groups, n - len(candidates), opts["confidence"], guesses)):
            reason = why
            break
    for group in groups:
        for member in group.members:
            candidates[member].votes = int(group.weight)
    if groups:
        chosen = candidates[groups[0].members[0]]
    else:
        chosen = candidates[0] if candidates else nothing_generated()
    details = {"votes": vote_table(groups), "samples": len(candidates), "n": n, "stop_reason": reason,
               "stopped_early": reason.startswith(("decided", "confident")), "tie_rule": TIE_RULE}
    return make_result(ctx, chosen, NAME, candidates, ctx.budget.used, details)
