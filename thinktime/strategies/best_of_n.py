"""best-of-n: sample N chains, score each, keep the best (or let scores vote: weighted majority).

Scorers (`scorer` option): "self" (the policy model judges each chain: yes/no), or a reward model
loaded through transformers: "prm:PATH" (Qwen2.5-Math-PRM, Skywork-o1-Open-PRM, RLHFlow PRMs; a
chain's step scores are combined by `aggregate`) or "orm:PATH" (one score per chain).
`select=best` keeps the highest-scored chain (ties: the first sampled); `select=weighted` sums the
scores of chains with math-equivalent answers and keeps the heaviest answer (weighted majority),
returning its best-scored chain.
"""
from __future__ import annotations

from thinktime.run_context import Context
from thinktime.sampling import generate, nothing_generated, sampling_temperature
from thinktime.scorers import AGGREGATES, aggregate, make_scorer
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.options import Option, positive, read_options
from thinktime.strategies.steps import DEFAULT_DELIMITER, split_steps
from thinktime.types import Event, Result
from thinktime.voting import group_answers, vote_answers

NAME = "best-of-n"
OPTIONS = {
    "n": Option(4, "chains to sample", int, positive),
    "scorer": Option("self", "self, prm:PATH, orm:PATH (or a Scorer object from Python)", str),
    "aggregate": Option("last", "how step scores make a chain's score", str, choices=AGGREGATES),
    "select": Option("best", "best: the top-scored chain; weighted: scores vote per answer", str,
                     choices=("best", "weighted")),
    "delimiter": Option(DEFAULT_DELIMITER, "what separates steps for a PRM", str, check=lambda v: len(v) > 0),
    "judges": Option(1, "self-judging: judgements per chain", int, positive),
    "judge_tokens": Option(256, "self-judging: the most tokens per judgement", int, positive),
}


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    n = opts["n"]
    scorer = make_scorer(ctx, opts["scorer"], judges=opts["judges"], judge_tokens=opts["judge_tokens"])
    max_new = ctx.params.max_new_tokens
    judged = n > 1  # one chain is the best of one: judging it would only take tokens from it
    if judged and ctx.budget.remaining is not None and scorer.name == "self":
        # Leave the judge its share, or a small budget would all go to chains nobody can judge.
        per_chain = max_new + opts["judges"] * opts["judge_tokens"]
        max_new = max(1, min(max_new, ctx.budget.remaining * max_new // per_chain // n))
    if ctx.cancel.is_set() or ctx.budget.cap(max_new, n) < 1:
        return make_result(ctx, nothing_generated(), NAME, [], ctx.budget.used,
                           {"stop_reason": "cancelled" if ctx.cancel.is_set() else "budget exhausted"})
    for i in range(n):
        ctx.emit(Event("candidate_started", i))
    out = generate(ctx, [ctx.prompt], n, max_new, temperature=sampling_temperature(ctx))
    if out is None:
        return make_result(ctx, nothing_generated(), NAME, [], ctx.budget.used,
                           {"stop_reason": "cancelled" if ctx.cancel.is_set() else "budget exhausted"})
    candidates = [to_candidate(c) for c in out[0]]
    chains = [split_steps(c.text, opts["delimiter"]) or [c.text] for c in candidates]
    step_scores = scorer.score(ctx.question, chains) if judged else [[None] for _ in candidates]
    for i, (candidate, steps) in enumerate(zip(candidates, step_scores)):
        candidate.score = aggregate(steps, opts["aggregate"]) if judged else None
        ctx.emit(Event("candidate_finished", i, data={"answer": candidate.answer, "score": candidate.score,
                                                      "tokens": candidate.usage.completion_tokens}))
    best = max(range(len(candidates)), key=lambda i: (candidates[i].score or 0.0, -i))
    details: dict = {"scorer": scorer.name if judged else None, "aggregate": opts["aggregate"],
                     "select": opts["select"], "scores": [c.score for c in candidates], "step_scores": step_scores}
    if ctx.cancel.is_set():
        details["stop_reason"] = "cancelled"
    elif getattr(scorer, "unjudged", 0):  # the scores are the neutral 0.5: say so, the choice is the first chain
        details["stop_reason"] = f"budget exhausted before judging ({scorer.unjudged} of {len(candidates)} unjudged)"
    if opts["select"] == "weighted" and judged:
        # Chains cut short vote with their last number only when no chain gave a real answer (voting.vote_answers).
        groups = group_answers(vote_answers(candidates), [c.score for c in candidates])
        details["votes"] = [{"answer": g.answer, "weight": round(g.weight, 4), "members": g.members} for g in groups]
        for g in groups:
            for m in g.members:
                candidates[m].votes = len(g.members)
        if groups:
            best = max(groups[0].members, key=lambda i: (candidates[i].score, -i))
    ctx.emit(Event("progress", data={"scores": details["scores"], "best": best}))
    return make_result(ctx, candidates[best], NAME, candidates, ctx.budget.used, details)
