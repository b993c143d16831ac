"""Test doubles for strategy logic: an engine whose outputs are scripted, and a scorer with fixed scores.

The scripted engine implements the Engine protocol honestly (n completions per prompt, stop strings
cut the text and end it with "stop", max_new_tokens cuts with "length"); a token is a word with its
trailing space, and ending the turn costs one token, as on the transformers engine.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from thinktime.engines.base import Engine
from thinktime.errors import BadInputError
from thinktime.scorers.base import Scorer
from thinktime.types import Completion, Prompt

_TOKEN = re.compile(r"\S+\s*|\s+")


class ScriptedEngine(Engine):
    name = "scripted"
    model_name = "scripted"

    def __init__(self, script: Callable[[Prompt, int], str] | Iterable[str], context_length: int | None = None):
        """`script(prompt, k)` gives the k-th sample's text for a prompt, or an iterable gives texts in order.
        With `context_length`, prompts and completions share a window as on the real engines: a prompt that
        fills it is refused, and a completion stops ("length") where the window ends."""
        self.context_length = context_length
        self.ordered = not callable(script)
        self.script = iter(script).__next__ if self.ordered else script
        self.calls: list[tuple[list[Prompt], object]] = []
        self.completion_tokens = 0  # everything it ever generated

    def render(self, prompt: Prompt) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in prompt.messages) + "assistant: " + prompt.prefix

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    def generate(self, prompts, params, cancel=None):
        if self.context_length:
            for prompt in prompts:
                if self.count_tokens(self.render(prompt)) >= self.context_length:
                    raise BadInputError("the prompt fills the context window")
        self.calls.append((list(prompts), params))
        out = []
        for prompt in prompts:
            row = []
            for k in range(params.n):
                text = self.script() if self.ordered else self.script(prompt, k)
                row.append(self._complete(prompt, text, params))
            out.append(row)
        self.completion_tokens += sum(c.completion_tokens for row in out for c in row)
        return out

    def _complete(self, prompt: Prompt, text: str, params) -> Completion:
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        pieces = _TOKEN.findall(text[:cut] if cut >= 0 else text)
        prompt_tokens = self.count_tokens(self.render(prompt))
        limit = params.max_new_tokens
        if self.context_length:
            limit = min(limit, self.context_length - prompt_tokens)
        if len(pieces) >= limit:
            pieces = pieces[:limit]
            return Completion("".join(pieces), "length", prompt_tokens, len(pieces), ended_turn=False)
        if cut >= 0:  # a stop string ended it: it is not part of the text, and no end-of-turn token was made
            return Completion("".join(pieces), "stop", prompt_tokens, len(pieces), ended_turn=False)
        return Completion("".join(pieces), "stop", prompt_tokens, len(pieces) + 1, ended_turn=True)


class FixedScorer(Scorer):
    """Scores a chain by its last step, looked up in a table (default 0)."""

    name = "fixed"

    def __init__(self, table: dict[str, float], per_step: bool = True):
        self.table, self.per_step = table, per_step
        self.seen: list[list[str]] = []

    def score(self, question, chains):
        self.seen.extend(list(c) for c in chains)
        return [[self.table.get(s, 0.0) for s in steps] or [0.0] for steps in chains]
