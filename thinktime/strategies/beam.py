"""beam: step-level beam search. Keep the `width` best partial chains; at each depth sample
`expansions` next steps for each, score every new chain (a PRM or the model's own judgement of the
chain so far), and keep the best `width` unfinished ones (the rest are pruned). A chain finishes
when its step gives a \\boxed{} answer or is empty (the model ended its turn). Search stops at
`depth`, when `width` chains have finished, or when none is left; the answer is the best-scored
finished chain (the best unfinished one when none finished). Ties go to the chain created first.
"""
from __future__ import annotations

from thinktime.run_context import Context
from thinktime.sampling import nothing_generated
from thinktime.strategies.base import make_result
from thinktime.strategies.options import Option, positive, read_options
from thinktime.strategies.search import (SEARCH_OPTIONS, best_branch, chain_candidate, expand, score_nodes,
                                         search_scorer)
from thinktime.strategies.steps import Tree
from thinktime.types import Event, Result

NAME = "beam"
OPTIONS = {"width": Option(4, "partial chains kept after each step", int, positive), **SEARCH_OPTIONS}


def _rank(node) -> tuple:
    return (-(node.score if node.score is not None else float("-inf")), node.id)


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    scorer = search_scorer(ctx, opts)
    tree = Tree()
    active = [tree.root]
    finished = []
    reason = "depth limit"
    for depth in range(1, opts["depth"] + 1):
        children = expand(ctx, tree, active, opts, call=depth)
        if children is None:
            reason = "cancelled" if ctx.cancel.is_set() else "budget exhausted"
            break
        score_nodes(ctx, scorer, tree, children, opts["aggregate"])
        finished += [c for c in children if c.finished]
        ranked = sorted((c for c in children if not c.finished), key=_rank)
        for node in ranked[opts["width"]:]:
            node.pruned = True
        active = ranked[: opts["width"]]
        leader = min(finished + active, key=_rank) if finished or active else None
        ctx.emit(Event("progress", data={"depth": depth, "active": len(active), "finished": len(finished),
                                         "best": best_branch(tree, leader) if leader else None}))
        if len(finished) >= opts["width"]:
            reason = "enough chains finished"
            break
        if not active:
            reason = "no chain left to extend"
            break
    if ctx.cancel.is_set():  # a cancel can land inside the judge, which returns neutral scores
        reason = "cancelled"
    leaves = sorted(finished, key=_rank) + sorted((n for n in active if n is not tree.root), key=_rank)
    candidates = [chain_candidate(tree, n, opts["delimiter"]) for n in leaves]
    for i, c in enumerate(candidates):
        ctx.emit(Event("candidate_finished", i, data={"answer": c.answer, "score": c.score}))
    chosen = candidates[0] if candidates else nothing_generated()
    details = {"tree": tree.to_dicts(), "stop_reason": reason, "scorer": scorer.name,
               "best": best_branch(tree, leaves[0]) if leaves else None,
               "finished": len(finished), "width": opts["width"],
               "unjudged": getattr(scorer, "unjudged", 0)}  # nodes scored a neutral 0.5: no budget left to judge
    return make_result(ctx, chosen, NAME, candidates, ctx.budget.used, details)
