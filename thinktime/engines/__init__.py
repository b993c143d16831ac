"""Engines turn prompts into completions. A strategy only ever sees the `Engine` protocol."""
from __future__ import annotations

import inspect

from thinktime.engines.base import Engine

ENGINES = ("transformers", "vllm", "openai")


def create_engine(kind: str, model: str | None, **options) -> Engine:
    """Build an engine by name; each engine module is imported only when asked for.

    `kind` is "transformers" (or "hf"), "vllm", "openai", or "openai:URL" (the base URL of any
    OpenAI-compatible server). Options left as None are dropped; an option the engine does not
    take is a usage error that names it.
    """
    from thinktime.errors import BadInputError

    options = {k: v for k, v in options.items() if v is not None}
    kind = (kind or "transformers").strip()
    if kind.startswith("openai:"):
        kind, options["base_url"] = "openai", kind[len("openai:"):]
    if kind in ("transformers", "hf"):
        from thinktime.engines.hf import TransformersEngine as cls
    elif kind == "vllm":
        from thinktime.engines.vllm import VLLMEngine as cls
    elif kind == "openai":
        from thinktime.engines.openai import OpenAIEngine as cls
    else:
        raise BadInputError(f"unknown engine {kind!r}",
                            hint=f"choose one of: {', '.join(ENGINES)} (or openai:URL for a server)")
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(k for k in options if k not in accepted)
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise BadInputError(f"the {kind} engine does not take {flags}",
                                hint="those options belong to another --engine (see thinktime solve --help)")
    return cls(model, **options)


__all__ = ["Engine", "ENGINES", "create_engine"]
