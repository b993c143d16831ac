"""Strategies turn thinking time into accuracy. Each is a module with NAME and run(ctx) -> Result."""
from __future__ import annotations

from collections.abc import Callable

from thinktime.errors import BadInputError
from thinktime.strategies import cot
from thinktime.strategies.base import Budget, Context
from thinktime.types import Result

STRATEGIES: dict[str, Callable[[Context], Result]] = {cot.NAME: cot.run}


def get_strategy(name: str) -> Callable[[Context], Result]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise BadInputError(f"unknown strategy {name!r}",
                            hint=f"choose one of: {', '.join(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "Budget", "Context", "get_strategy"]
