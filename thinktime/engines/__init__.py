"""Engines turn prompts into completions. A strategy only ever sees the `Engine` protocol."""
from __future__ import annotations

import importlib.util
import inspect
import warnings

from thinktime.engines.base import Engine

ENGINES = ("auto", "transformers", "llamacpp", "vllm", "openai")


def create_engine(kind: str, model: str | None, **options) -> Engine:
    """Build an engine by name; each engine module is imported only when asked for.

    `kind` is "auto" (llama.cpp for a GGUF on the CPU where it is installed, else transformers),
    "transformers" (or "hf"), "llamacpp", "vllm", "openai", or "openai:URL" (the base URL of any
    OpenAI-compatible server). Options left as None are dropped; an option the engine does not
    take is a usage error that names it.
    """
    from thinktime.errors import BadInputError

    options = {k: v for k, v in options.items() if v is not None}
    kind = (kind or "auto").strip()
    if kind == "auto":
        kind = pick_engine(model, options.get("device"), options.get("dtype"))
    if kind.startswith("openai:"):
        kind, options["base_url"] = "openai", kind[len("openai:"):]
    if kind in ("transformers", "hf"):
        from thinktime.engines.hf import TransformersEngine as cls
    elif kind in ("llamacpp", "llama.cpp", "gguf"):
        from thinktime.engines.llamacpp import LlamaCppEngine as cls
        kind = "llamacpp"
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


def pick_engine(model: str | None, device: str | None = None, dtype: str | None = None) -> str:
    """What "auto" runs: a GGUF model on the CPU goes to llama.cpp, on its own quantised weights, where
    llama-cpp-python is installed; anything else (a GPU, a dtype asked for, a folder without a GGUF), or
    without it, to transformers (saying once how to get the faster one)."""
    from thinktime import models

    if device not in (None, "", "auto", "cpu") or dtype not in (None, "", "auto") or not model \
            or models.gguf_file(model) is None:
        return "transformers"
    if device in (None, "", "auto") and cuda_visible():
        return "transformers"
    if importlib.util.find_spec("llama_cpp") is None:
        _say_once(f"thinktime: {model} is a GGUF model; llama.cpp would run it several times faster on this "
                  "CPU: pip install 'thinktime[llamacpp]'. Using transformers.")
        return "transformers"
    return "llamacpp"


def cuda_visible() -> bool:
    """A GPU torch can use. A CPU build of torch is known by its version, without the second that importing it
    takes (a llama.cpp process on a CPU never needs torch)."""
    from importlib import metadata

    try:
        if "+cpu" in metadata.version("torch"):
            return False
        import torch
    except (ImportError, metadata.PackageNotFoundError):
        return False
    return torch.cuda.is_available()


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = ["Engine", "ENGINES", "create_engine", "pick_engine"]
