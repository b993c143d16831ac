"""Engines turn prompts into completions. A strategy only ever sees the `Engine` protocol."""
from __future__ import annotations

from thinktime.engines.base import Engine

ENGINES = ("transformers",)


def create_engine(kind: str, model: str, **options) -> Engine:
    """Build an engine by name; each engine module is imported only when asked for."""
    if kind in ("transformers", "hf"):
        from thinktime.engines.hf import TransformersEngine

        return TransformersEngine(model, **options)
    from thinktime.errors import BadInputError

    raise BadInputError(f"unknown engine {kind!r}", hint=f"choose one of: {', '.join(ENGINES)}")


__all__ = ["Engine", "ENGINES", "create_engine"]
