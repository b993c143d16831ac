"""Step-level preference pairs and SFT chains from a searched tree (rStar-Math, section 3.3).

At each node, its children that have a correct outcome somewhere below them (a rollout or a finished chain
that reaches the gold) are the candidates for the chosen side, best `per_side` by Q; those with a wrong outcome
below are the candidates for the rejected side, worst `per_side` by Q. A pair is kept when the chosen Q
exceeds the rejected Q by at least `margin` and the two steps are not near-copies (difflib's similarity ratio
below `max_similarity`). Both sides continue the same prefix: the steps from the root to that node.
SFT chains are the correct, finished outcomes, ranked by the mean Q of the steps on their path (rStar-Math
keeps the correct trajectories with the highest average Q), then by the steps the tree searched.

A tree is the list of node dicts that the mcts strategy writes (steps.Node.to_dict), each with the
"outcomes" its rollouts had (rollout.Outcome.to_dict); Q = 2 * value - 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from thinktime.treesearch.rollout import chain_text


@dataclass(frozen=True)
class PairFilter:
    margin: float = 0.5  # the least Q(chosen) - Q(rejected)
    max_similarity: float = 0.9  # pairs whose steps are at least this similar (0..1) are dropped
    per_side: int = 2  # rStar-Math: top-2 against bottom-2


def q_value(node: dict) -> float:
    return 2.0 * node.get("value", 0.0) - 1.0


def children_of(tree: Sequence[dict]) -> dict[int, list[dict]]:
    kids: dict[int, list[dict]] = {n["id"]: [] for n in tree}
    for n in tree:
        if n["parent"] is not None:
            kids[n["parent"]].append(n)
    return kids


def steps_to(tree: Sequence[dict], node: dict) -> list[str]:
    """The non-empty steps from the root down to `node`, as the search continued them."""
    steps = []
    while node["parent"] is not None:
        if node["step"].strip():
            steps.append(node["step"])
        node = tree[node["parent"]]
    return steps[::-1]


def outcomes_below(tree: Sequence[dict]) -> dict[int, tuple[bool, bool]]:
    """For each node: (a correct outcome below it or at it, a wrong one below it or at it)."""
    found = {n["id"]: (any(o["correct"] for o in n.get("outcomes", ())),
                       any(not o["correct"] for o in n.get("outcomes", ()))) for n in tree}
    for n in sorted(tree, key=lambda n: -n["depth"]):  # deepest first: children before their parents
        if n["parent"] is not None:
            right, wrong = found[n["parent"]]
            found[n["parent"]] = (right or found[n["id"]][0], wrong or found[n["id"]][1])
    return found


def similarity(a: str, b: str) -> float:
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def step_pairs(tree: Sequence[dict], problem_id: str, question: str, rules: PairFilter) -> list[dict]:
    """The preference pairs of one tree, in the pairs format of docs/training.md."""
    below, kids = outcomes_below(tree), children_of(tree)
    pairs = []
    for node in tree:
        options = [c for c in kids[node["id"]] if c["step"].strip() and c.get("visits")]
        good = sorted((c for c in options if below[c["id"]][0]), key=lambda c: (-q_value(c), c["id"]))
        bad = sorted((c for c in options if below[c["id"]][1]), key=lambda c: (q_value(c), c["id"]))
        prefix = None
        for chosen in good[:rules.per_side]:
            for rejected in bad[:rules.per_side]:
                if chosen is rejected or q_value(chosen) - q_value(rejected) < rules.margin:
                    continue
                if similarity(chosen["step"], rejected["step"]) >= rules.max_similarity:
                    continue
                prefix = steps_to(tree, node) if prefix is None else prefix
                pairs.append({"id": problem_id, "prompt": question, "prefix": prefix, "chosen": [chosen["step"]],
                              "rejected": [rejected["step"]], "chosen_value": round(q_value(chosen), 4),
                              "rejected_value": round(q_value(rejected), 4)})
    return pairs


def best_chains(tree: Sequence[dict], keep: int, delimiter: str) -> list[tuple[str, float]]:
    """Up to `keep` distinct correct chains that the model finished itself, with the mean Q of their path."""
    ranked = []
    for node in tree:
        correct = [o for o in node.get("outcomes", ()) if o["correct"] and o["finish"] == "stop"]
        if not correct:
            continue
        path, walk = [], node
        while walk["parent"] is not None:
            path.append(q_value(walk))
            walk = tree[walk["parent"]]
        mean_q = sum(path) / len(path)
        ranked.extend((-mean_q, -node["depth"], node["id"], chain_text(steps_to(tree, node), o["rollout"], delimiter))
                      for o in correct)
    chains, seen = [], set()
    for negative_q, _, _, text in sorted(ranked, key=lambda r: r[:3]):  # ties: the longer searched path first
        if " ".join(text.split()) not in seen:
            seen.add(" ".join(text.split()))
            chains.append((text, round(-negative_q, 4)))
    return chains[:keep]
