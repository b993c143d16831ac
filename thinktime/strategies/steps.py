"""Steps of a chain and the search tree over them, shared by best-of-n, beam and mcts.

A step is a paragraph (text up to a blank line) or whatever a configurable delimiter separates.
Step-level search continues a partial chain through `Prompt.prefix`: the steps so far, each
followed by the delimiter, form the start of the assistant's reply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from thinktime.answers import find_boxed
from thinktime.types import Prompt

DEFAULT_DELIMITER = "\n\n"


def split_steps(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    return [s for s in (part.strip() for part in text.split(delimiter)) if s]


def continuation(prompt: Prompt, steps: list[str], delimiter: str) -> Prompt:
    """The prompt that asks for the step after `steps`."""
    return Prompt(prompt.messages, prompt.prefix + "".join(s + delimiter for s in steps))


def ends_chain(step: str, ended_turn: bool | None = None) -> bool:
    """A step ends the chain when it gives a boxed answer or the model ended its turn with it. Where the
    engine cannot tell a turn's end from the delimiter (ended_turn None), an empty step is taken as the end."""
    if find_boxed(step) or ended_turn:
        return True
    return ended_turn is None and not step.strip()


@dataclass
class Node:
    """One step in the search tree; the root holds no step."""

    id: int
    parent: int | None
    step: str
    depth: int
    score: float | None = None  # the scorer's value for the chain up to and including this step
    finished: bool = False  # this step ends the chain (an answer, or the turn ended)
    pruned: bool = False  # beam: dropped from the beam
    visits: int = 0  # mcts
    value_sum: float = 0.0  # mcts
    children: list[int] = field(default_factory=list)
    tokens: int = 0  # completion tokens of this step

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def to_dict(self) -> dict:
        d = {"id": self.id, "parent": self.parent, "depth": self.depth, "step": self.step,
             "score": None if self.score is None else round(self.score, 4), "finished": self.finished,
             "tokens": self.tokens}
        if self.pruned:
            d["pruned"] = True
        if self.visits:
            d.update(visits=self.visits, value=round(self.value, 4))
        return d


class Tree:
    def __init__(self):
        self.nodes = [Node(0, None, "", 0)]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add(self, parent: Node, step: str, tokens: int) -> Node:
        node = Node(len(self.nodes), parent.id, step, parent.depth + 1, tokens=tokens)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path(self, node: Node) -> list[Node]:
        """Root's first child down to `node`."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = self.nodes[node.parent]
        return out[::-1]

    def steps(self, node: Node) -> list[str]:
        return [n.step for n in self.path(node) if n.step.strip()]

    def to_dicts(self) -> list[dict]:
        return [n.to_dict() for n in self.nodes]


def uct(child: Node, parent_visits: int, exploration: float) -> float:
    """Upper confidence bound for trees: mean value plus an exploration bonus for rarely visited children."""
    if child.visits == 0:
        return math.inf
    return child.value + exploration * math.sqrt(math.log(max(1, parent_visits)) / child.visits)
