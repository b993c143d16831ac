"""mcts: Monte Carlo tree search over steps. Each iteration selects a path from the root by UCT
(mean value + `exploration` * sqrt(ln N_parent / N_child), unvisited children first, ties to the
oldest), expands the node it reaches with `expansions` sampled next steps, scores each new chain
(a PRM or the model's own judgement, no rollout), and backs each score up the path: every node on
it gains a visit and the score. A selected node that ends its chain (a \\boxed{} answer, an empty
step, or `depth` steps) is not expanded: its score is backed up again, reinforcing it.
The answer: the finished chain with the best mean value (ties: the higher score, then the oldest);
when none finished, the chain reached by following the most-visited children from the root.
"""
from __future__ import annotations

from thinktime.run_context import Context
from thinktime.sampling import nothing_generated
from thinktime.strategies.base import make_result
from thinktime.strategies.options import Option, positive, read_options
from thinktime.strategies.search import (SEARCH_OPTIONS, best_branch, chain_candidate, expand, score_nodes,
                                         search_scorer)
from thinktime.strategies.steps import Node, Tree, uct
from thinktime.types import Event, Result

NAME = "mcts"
OPTIONS = {
    "iterations": Option(8, "select-expand-score-backup rounds", int, positive),
    "exploration": Option(1.0, "UCT exploration weight", float, lambda v: v >= 0),
    **SEARCH_OPTIONS,
}


def select(tree: Tree, exploration: float, max_depth: int) -> Node:
    node = tree.root
    while node.children and not node.finished and node.depth < max_depth:
        children = [tree.nodes[i] for i in node.children]
        node = max(children, key=lambda c: (uct(c, node.visits, exploration), -c.id))
    return node


def backup(tree: Tree, node: Node, value: float) -> None:
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = tree.nodes[node.parent] if node.parent is not None else None


def most_visited_leaf(tree: Tree) -> Node:
    node = tree.root
    while node.children:
        node = max((tree.nodes[i] for i in node.children), key=lambda c: (c.visits, c.value, -c.id))
    return node


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    scorer = search_scorer(ctx, opts)
    tree = Tree()
    reason = "iterations used up"
    completed = 0
    for iteration in range(1, opts["iterations"] + 1):
        node = select(tree, opts["exploration"], opts["depth"])
        if node is not tree.root and (node.finished or node.depth >= opts["depth"]):
            backup(tree, node, node.score or 0.0)
        else:
            children = expand(ctx, tree, [node], opts, call=iteration)
            if children is None:
                reason = "cancelled" if ctx.cancel.is_set() else "budget exhausted"
                break
            score_nodes(ctx, scorer, tree, children, opts["aggregate"])
            for child in children:
                backup(tree, child, child.score or 0.0)
            if not children:  # nothing new (cannot happen with expansions >= 1): count the visit
                backup(tree, node, node.score or 0.0)
        completed = iteration
        leader = _best(tree)
        ctx.emit(Event("progress", data={"iteration": iteration, "nodes": len(tree.nodes) - 1,
                                         "best": best_branch(tree, leader) if leader else None}))
    if ctx.cancel.is_set():  # a cancel can land inside the judge, which returns neutral scores
        reason = "cancelled"
    finished = sorted((n for n in tree.nodes if n.finished), key=_finished_rank)
    leaves = finished or ([most_visited_leaf(tree)] if len(tree.nodes) > 1 else [])
    candidates = [chain_candidate(tree, n, opts["delimiter"]) for n in leaves]
    for i, c in enumerate(candidates):
        ctx.emit(Event("candidate_finished", i, data={"answer": c.answer, "score": c.score}))
    chosen = candidates[0] if candidates else nothing_generated()
    details = {"tree": tree.to_dicts(), "stop_reason": reason, "scorer": scorer.name,
               "best": best_branch(tree, leaves[0]) if leaves else None, "iterations": completed,
               "unjudged": getattr(scorer, "unjudged", 0)}  # nodes scored a neutral 0.5: no budget left to judge
    return make_result(ctx, chosen, NAME, candidates, ctx.budget.used, details)


def _finished_rank(node: Node) -> tuple:
    return (-node.value, -(node.score or 0.0), node.id)


def _best(tree: Tree) -> Node | None:
    finished = [n for n in tree.nodes if n.finished]
    if finished:
        return min(finished, key=_finished_rank)
    return most_visited_leaf(tree) if len(tree.nodes) > 1 else None
