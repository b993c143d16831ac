"""Strategies turn thinking time into accuracy. Each is a module with NAME and run(ctx) -> Result."""
from __future__ import annotations

from collections.abc import Callable

from thinktime.errors import BadInputError
from thinktime.run_context import Budget, Context
from thinktime.strategies import allocation, beam, best_of_n, budget_forcing, cot, mcts, reflect, self_consistency
from thinktime.types import Result

STRATEGIES: dict[str, Callable[[Context], Result]] = {
    m.NAME: m.run for m in (cot, self_consistency, best_of_n, reflect, budget_forcing, beam, mcts, allocation)
}
# What each strategy accepts in `options` (cot takes none); the CLI and docs read this.
STRATEGY_OPTIONS = {m.NAME: getattr(m, "OPTIONS", {}) for m in
                    (cot, self_consistency, best_of_n, reflect, budget_forcing, beam, mcts, allocation)}

# The option that sets each strategy's size: what `eval -n` scales and what a served model's `:strategy-N` sets.
SCALE_OPTION = {"self-consistency": "n", "best-of-n": "n", "reflect": "rounds", "budget": "max_tokens",
                "beam": "width", "mcts": "iterations", "allocation": "tokens"}


# Short names people type for a strategy (a served model's suffix, eval's -s); each applies only when its target exists.
STRATEGY_ALIASES = {"sc": "self-consistency", "maj": "self-consistency", "majority": "self-consistency",
                    "bon": "best-of-n", "best-of": "best-of-n", "budget-forcing": "budget", "s1": "budget"}


def resolve_strategy(name: str) -> str | None:
    """A strategy's name from its name or an alias; None when neither."""
    if name in STRATEGIES:
        return name
    target = STRATEGY_ALIASES.get(name)
    return target if target in STRATEGIES else None


def get_strategy(name: str) -> Callable[[Context], Result]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise BadInputError(f"unknown strategy {name!r}",
                            hint=f"choose one of: {', '.join(STRATEGIES)}") from None


def check_options(name: str, options: dict) -> dict:
    """Refuse unknown strategy options and bad values before any model call; returns the options given, each
    as its option's type (command-line text "4" as 4 for an int option, and "2" stays "2" for a text one)."""
    from thinktime.strategies.options import read_options

    values = read_options(name, STRATEGY_OPTIONS.get(name, {}), options)
    return {k: values.get(k, v) for k, v in options.items()}


__all__ = ["check_options", "SCALE_OPTION", "STRATEGIES", "STRATEGY_ALIASES", "STRATEGY_OPTIONS", "Budget", "Context",
           "get_strategy", "resolve_strategy"]
