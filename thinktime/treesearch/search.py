"""One problem's tree: the mcts strategy with rollouts to the gold answer as its value source.

The record it gives (one line of the run's records.jsonl) holds the whole tree, each node with its visits,
mean value and the graded outcomes of its rollouts, so that pairs and SFT rows can be drawn from it again
with other filters, without searching again.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from thinktime.strategies import get_strategy
from thinktime.strategies.steps import DEFAULT_DELIMITER
from thinktime.treesearch.pairs import steps_to
from thinktime.treesearch.rollout import RolloutValue


@dataclass(frozen=True)
class TreeSettings:
    iterations: int = 16  # select-expand-roll out-back up rounds per problem
    expansions: int = 2  # next steps sampled at each expanded node
    depth: int = 8  # the most steps in a chain
    step_tokens: int = 96  # the most tokens per step
    rollouts: int = 1  # rollouts from each new node
    rollout_tokens: int = 256  # the most tokens per rollout
    exploration: float = 1.0  # UCT weight, on the [0, 1] value scale the strategy backs up
    temperature: float = 0.8
    seed: int = 0
    delimiter: str = DEFAULT_DELIMITER

    def strategy_options(self) -> dict:
        return {"iterations": self.iterations, "expansions": self.expansions, "depth": self.depth,
                "step_tokens": self.step_tokens, "exploration": self.exploration, "delimiter": self.delimiter}

    def to_dict(self) -> dict:
        return asdict(self)


def problem_seed(settings: TreeSettings, index: int) -> int:
    """Each problem its own reproducible seed, whatever else the run holds."""
    return settings.seed + 7_919 * index


def search_problem(thinker, problem, index: int, settings: TreeSettings, budget: int | None) -> dict | None:
    """Search one problem's tree within `budget` generated tokens (None: no cap); its record, or None when the
    budget ran out before the search finished (a cut tree is not kept: its values would be partial)."""
    started = time.perf_counter()
    ctx = thinker.context(problem.question, strategy="mcts", budget_tokens=budget, options=settings.strategy_options(),
                          temperature=settings.temperature, seed=problem_seed(settings, index))
    value = RolloutValue(ctx, problem.gold, rollouts=settings.rollouts, max_tokens=settings.rollout_tokens,
                         delimiter=settings.delimiter)
    ctx.options["scorer"] = value
    result = get_strategy("mcts")(ctx)
    if value.cut or result.details["stop_reason"] != "iterations used up":
        return None
    tree = attach_outcomes(result.details["tree"], value)
    return {"id": problem.id, "question": problem.question, "gold": problem.gold,
            "messages": thinker.messages(problem.question), "tree": tree,
            "solved": any(o["correct"] for n in tree for o in n.get("outcomes", ())),
            "completion_tokens": ctx.budget.used.completion_tokens, "prompt_tokens": ctx.budget.used.prompt_tokens,
            "seconds": round(time.perf_counter() - started, 2)}


def attach_outcomes(tree: list[dict], value: RolloutValue) -> list[dict]:
    """Give each node the outcomes of its own rollouts. The strategy scores nodes in the order it creates them,
    so a chain's outcomes go to its nodes in that order (a finished empty step shares its parent's chain)."""
    queues = {steps: list(found) for steps, found in value.outcomes.items()}
    for node in tree[1:]:
        steps = tuple(steps_to(tree, node))
        queue = queues.get(steps)
        node["outcomes"] = [o.to_dict() for o in queue.pop(0)] if queue else []
    return tree

