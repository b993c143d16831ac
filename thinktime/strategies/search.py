"""What beam and mcts share: their options, expanding a node by sampling next steps, scoring chains."""
from __future__ import annotations

from thinktime.answers import find_boxed
from thinktime.run_context import Context
from thinktime.sampling import generate, sampling_temperature
from thinktime.scorers import AGGREGATES, Scorer, aggregate, make_scorer
from thinktime.strategies.options import Option, positive
from thinktime.strategies.steps import DEFAULT_DELIMITER, Node, Tree, continuation, ends_chain
from thinktime.types import Candidate, Usage

SEARCH_OPTIONS = {
    "expansions": Option(2, "next steps sampled from each node it expands", int, positive),
    "depth": Option(8, "the most steps in a chain", int, positive),
    "step_tokens": Option(256, "the most tokens per step", int, positive),
    "delimiter": Option(DEFAULT_DELIMITER, "what ends a step (default: a blank line, i.e. a paragraph)", str,
                        check=lambda v: len(v) > 0),
    "scorer": Option("self", "self (the model judges the chain so far), prm:PATH, orm:PATH", str),
    "aggregate": Option("last", "how a PRM's step scores make the chain's score", str, choices=AGGREGATES),
    "judges": Option(1, "self-judging: judgements per chain", int, positive),
    "judge_tokens": Option(128, "self-judging: the most tokens per judgement", int, positive),
}


def search_scorer(ctx: Context, opts: dict) -> Scorer:
    return make_scorer(ctx, opts["scorer"], partial=True, judges=opts["judges"], judge_tokens=opts["judge_tokens"])


def expand(ctx: Context, tree: Tree, nodes: list[Node], opts: dict, call: int) -> list[Node] | None:
    """Sample `expansions` next steps for each node in one engine call; the new children (siblings with
    the same text are kept once), or None when the budget or a cancel leaves no room."""
    delimiter = opts["delimiter"]
    prompts = [continuation(ctx.prompt, tree.steps(node), delimiter) for node in nodes]
    out = generate(ctx, prompts, opts["expansions"], opts["step_tokens"], call=call,
                   temperature=sampling_temperature(ctx), stop=(delimiter,))
    if out is None:
        return None
    children = []
    for node, completions in zip(nodes, out):
        seen: dict[str, Node] = {}
        for completion in completions:
            step = completion.text.strip()
            if step in seen:  # a duplicate adds nothing to search, but its tokens were spent
                seen[step].tokens += completion.completion_tokens
                continue
            finished = completion.finish_reason == "stop" and ends_chain(step, completion.ended_turn)
            if not step and not finished:  # the delimiter at once, or a cut: no step to build on
                continue
            child = tree.add(node, step, completion.completion_tokens)
            child.finished = finished or bool(find_boxed(step))
            seen[step] = child
            children.append(child)
    return children


def score_nodes(ctx: Context, scorer: Scorer, tree: Tree, nodes: list[Node], how: str) -> None:
    if not nodes:
        return
    chains = [tree.steps(n) or [""] for n in nodes]
    for node, steps in zip(nodes, scorer.score_ended(ctx.question, chains, [n.finished for n in nodes])):
        node.score = aggregate(steps, how)


def chain_candidate(tree: Tree, node: Node, delimiter: str) -> Candidate:
    """The chain from the root to `node` as a candidate; its tokens are the steps' tokens."""
    from thinktime.strategies.base import to_candidate
    from thinktime.types import Completion

    path = tree.path(node)
    text = delimiter.join(n.step for n in path if n.step)
    candidate = to_candidate(Completion(text, "stop" if node.finished else "length", 0, sum(n.tokens for n in path)))
    candidate.usage = Usage(0, sum(n.tokens for n in path))
    candidate.score = node.score
    return candidate


def best_branch(tree: Tree, node: Node) -> dict:
    return {"node": node.id, "score": node.score, "steps": tree.steps(node)}
