"""The run context and its token budget: what strategies and scorers share, below both of them."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from thinktime.engines.base import Engine
from thinktime.types import Completion, Event, Prompt, SamplingParams, Usage


class Budget:
    """A cap on generated (completion) tokens for a whole strategy run; `None` means no cap."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.used = Usage()

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used.completion_tokens)

    @property
    def exhausted(self) -> bool:
        return self.remaining == 0

    def cap(self, max_new_tokens: int, n: int = 1) -> int:
        """The most new tokens each of `n` parallel samples may take without overrunning the cap."""
        if self.remaining is None:
            return max_new_tokens
        return max(0, min(max_new_tokens, self.remaining // max(1, n)))

    def charge(self, completions: list[Completion], prompt_tokens: int = 0) -> None:
        self.used = self.used + Usage(prompt_tokens, sum(c.completion_tokens for c in completions))


@dataclass
class Context:
    """Everything a strategy needs for one question; a strategy never sees a concrete engine class."""

    question: str
    prompt: Prompt
    engine: Engine
    params: SamplingParams
    budget: Budget = field(default_factory=Budget)
    emit: Callable[[Event], None] = lambda event: None
    cancel: threading.Event = field(default_factory=threading.Event)
    options: dict = field(default_factory=dict)  # strategy-specific settings (n, width, ...)
    started: float = field(default_factory=time.perf_counter)
    lang: str | None = None  # the language of what strategies write into the chain (Wait, checks); None: the question's

    def sampling(self, **changes) -> SamplingParams:
        return replace(self.params, **changes)

    @property
    def language(self) -> str:
        from thinktime.prompts import detect_language

        return self.lang or detect_language(self.question)
