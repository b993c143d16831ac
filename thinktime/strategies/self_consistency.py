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

With log-probabilities (the llama.cpp engine), DeepConf's rules (thinktime.confidence): votes weighted by each
chain's lowest group confidence (`weights=confidence`), only the most confident share of chains voting
(`keep`), and, after a first round of warm-up chains, later chains stopped as soon as their group confidence
falls below the level the warm-up's top `keep` reached (`early_stop`); stopped chains cast no vote.
With `probe` (any engine), each chain is asked for its answer every `probe` tokens and stops once
`probe_agree` probes in a row agree (Dynasor-CoT; strategies/probing.py).
"""
from __future__ import annotations

from math import comb

from thinktime import confidence as conf
from thinktime.errors import BadInputError
from thinktime.run_context import Context
from thinktime.sampling import generate, nothing_generated, sampling_temperature
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.options import Option, positive, probability, read_options
from thinktime.strategies.probing import probed_chains
from thinktime.types import Candidate, Event, Result
from thinktime.voting import VoteGroup, group_answers, is_guess, vote_answers

NAME = "self-consistency"
TIE_RULE = "equal votes: the answer sampled first wins"
OPTIONS = {
    "n": Option(8, "the most chains to sample", int, positive),
    "round": Option(None, "chains per engine call; below n, sampling stops once the vote is decided", int, positive),
    "confidence": Option(0.95, "stop early once P(leader is the majority) reaches this; 1 turns it off",
                         float, probability),
    "weights": Option("count", "count: a vote per chain; confidence: votes weighted by the chain's lowest group "
                      "confidence (DeepConf; needs log-probabilities)", str, choices=("count", "confidence")),
    "keep": Option(1.0, "vote with this most confident share of the chains (DeepConf's filter; below 1 needs "
                   "log-probabilities)", float, lambda v: 0.0 < v <= 1.0),
    "early_stop": Option(False, "chains after the first round stop once their group confidence falls below what "
                         "the first round's top `keep` reached (needs round < n and log-probabilities)", bool),
    "window": Option(32, "tokens per group when measuring a stretch's confidence", int, positive),
    "probe": Option(0, "ask each chain for its answer every this many tokens, and stop it once its answers agree "
                    "(0: off)", int, lambda v: v >= 0),
    "probe_agree": Option(2, "probes in a row that must give the same answer to stop a chain", int, positive),
}
TOP_LOGPROBS = 5  # the top-k a token's confidence is read from


def leader_probability(leader: int, runner_up: int) -> float:
    """P(p > 1/2) for p ~ Beta(leader + 1, runner_up + 1), exactly: a binomial tail for integer votes."""
    trials = leader + runner_up + 1
    return sum(comb(trials, k) for k in range(leader + 1)) / 2**trials


def stop_reason(groups: list[VoteGroup], remaining: int, confidence: float, guesses: bool = False) -> str | None:
    """Why sampling can stop now, or None to keep sampling. Votes that are only guesses (`guesses`: no chain
    gave a real answer yet) decide nothing: one real answer to come would void them all."""
    if not groups or guesses:
        return None
    leader = len(groups[0].members)  # chains, not weights: the Beta rule counts votes
    runner_up = max((len(g.members) for g in groups[1:]), default=0)
    if leader > runner_up + remaining:
        return "decided: the leader cannot be overtaken"
    if confidence < 1.0 and leader_probability(leader, runner_up) >= confidence:
        return f"confident: P(leader is the majority) >= {confidence:g}"
    return None


def vote_table(groups: list[VoteGroup], weighted: bool = False) -> list[dict]:
    return [{"answer": g.answer, "votes": len(g.members), "members": list(g.members),
             **({"weight": round(g.weight, 4)} if weighted else {})} for g in groups]


def choose(candidates: list[Candidate], groups: list[VoteGroup]) -> Candidate:
    """Each candidate learns its answer's votes; the leading answer's first chain is chosen."""
    for group in groups:
        for member in group.members:
            candidates[member].votes = len(group.members)
    if groups:
        return candidates[groups[0].members[0]]
    return candidates[0] if candidates else nothing_generated()


def uses_confidence(opts: dict) -> bool:
    return opts["weights"] == "confidence" or opts["keep"] < 1.0 or opts["early_stop"]


def check_confidence(ctx: Context, opts: dict) -> None:
    """A confidence rule needs log-probabilities: an engine without them is named before anything is generated."""
    if opts["probe"] and uses_confidence(opts):
        raise BadInputError("probe stops chains by their answers, the confidence rules by their log-probabilities: "
                            "use one of them")
    if opts["early_stop"] and min(opts["round"] or opts["n"], opts["n"]) >= opts["n"]:
        raise BadInputError("early_stop learns its threshold from a first round of chains: set round below n",
                            hint="e.g. -o round=4 with -n 16")
    if uses_confidence(opts) and not getattr(ctx.engine, "returns_logprobs", False):
        raise BadInputError(f"self-consistency's confidence rules (weights=confidence, keep < 1, early_stop) read "
                            f"log-probabilities, which the {ctx.engine.name} engine does not return",
                            hint="use --engine llamacpp, transformers or vllm, or a server that returns "
                                 "log-probabilities; or drop those options")


def confident_votes(candidates: list[Candidate], completions_confidence: list[float | None], opts: dict):
    """The answers chains vote with and their weights: stopped chains cast none, only the top `keep` share by
    confidence votes, weighted by confidence or one each."""
    answers = vote_answers(candidates)
    answers = [None if c.finish_reason == "low_confidence" else a for a, c in zip(answers, candidates)]
    if not uses_confidence(opts):
        return answers, None
    scored = sorted((s for s, a in zip(completions_confidence, answers) if a is not None and s is not None),
                    reverse=True)
    if scored and opts["keep"] < 1.0:
        cut = scored[max(1, round(opts["keep"] * len(scored))) - 1]
        answers = [a if s is not None and s >= cut else None for a, s in zip(answers, completions_confidence)]
    weights = [s or 0.0 for s in completions_confidence] if opts["weights"] == "confidence" else None
    return answers, weights


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    check_confidence(ctx, opts)
    n = opts["n"]
    size = min(opts["round"] or n, n)
    scores: list[float | None] = []  # each chain's lowest group confidence, when log-probabilities are read
    extra = {"logprobs": TOP_LOGPROBS} if uses_confidence(opts) else {}
    stop_level = None
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
        stop = {"stop_below": (opts["window"], stop_level)} if stop_level is not None else {}
        if opts["probe"]:
            chains, calls = probed_chains(ctx, k, max_new, every=opts["probe"], agree=opts["probe_agree"], call=call,
                                          temperature=sampling_temperature(ctx))
            out, call = (None if chains is None else [chains]), call + calls
        else:
            out = generate(ctx, [ctx.prompt], k, max_new, call=call, temperature=sampling_temperature(ctx), **extra,
                           **stop)
            call += 1
        if out is None:
            reason = "cancelled" if ctx.cancel.is_set() else "budget exhausted"
            break
        for i, completion in enumerate(out[0], first):
            candidate = to_candidate(completion)
            candidates.append(candidate)
            scores.append(conf.lowest_group_confidence(completion.logprobs, opts["window"]))
            candidate.score = scores[-1]
            ctx.emit(Event("candidate_finished", i, data={"answer": candidate.answer,
                                                          "tokens": completion.completion_tokens}))
        if opts["early_stop"] and stop_level is None and (warm := [s for s in scores if s is not None]):
            stop_level = conf.threshold(warm, opts["keep"])  # learnt from the first round: the warm-up
        answers, weights = confident_votes(candidates, scores, opts)
        groups = group_answers(answers, weights)
        ctx.emit(Event("progress", data={"votes": vote_table(groups, weights is not None),
                                         "samples": len(candidates), "n": n}))
        guesses = all(a is None or is_guess(c) for a, c in zip(answers, candidates))
        if len(candidates) < n and (why := stop_reason(groups, n - len(candidates), opts["confidence"], guesses)):
            reason = why
            break
    chosen = choose(candidates, groups)
    details = {"votes": vote_table(groups, opts["weights"] == "confidence"), "samples": len(candidates), "n": n,
               "stop_reason": reason, "stopped_early": reason.startswith(("decided", "confident")), "tie_rule": TIE_RULE}
    if uses_confidence(opts):
        details["confidence"] = {"chains": scores, "stop_level": stop_level, "window": opts["window"],
                                 "stopped_chains": sum(c.finish_reason == "low_confidence" for c in candidates)}
    return make_result(ctx, chosen, NAME, candidates, ctx.budget.used, details)
