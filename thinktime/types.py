"""The data that flows through thinktime: prompts in, completions out of engines, results out of strategies."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "low_confidence"]


@dataclass(frozen=True)
class Prompt:
    """Chat messages, optionally followed by the start of the assistant's reply to continue from.

    `prefix` lets a strategy continue a partial chain (budget forcing, step-level search) without
    the engine knowing why.
    """

    messages: tuple[dict[str, str], ...]
    prefix: str = ""

    @staticmethod
    def of(messages: list[dict[str, str]], prefix: str = "") -> "Prompt":
        return Prompt(tuple(dict(m) for m in messages), prefix)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # One seed per prompt of a generate call, in place of `seed`: each prompt's samples are then what
    # that prompt alone with its seed would draw, whatever else is in the batch (an eval's problems).
    seeds: tuple[int, ...] | None = None
    # None: no log-probabilities (nobody pays for them); k >= 0: each new token's log-probability under the
    # model (before temperature and top-p) and its k most likely alternatives (Completion.logprobs).
    logprobs: int | None = None
    # (window, threshold): a row whose mean token confidence over its last `window` tokens falls below `threshold`
    # ends there, finish_reason "low_confidence" (DeepConf's early stop; thinktime.confidence). Needs logprobs.
    stop_below: tuple[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def for_prompt(self, index: int) -> "SamplingParams":
        """The settings of prompt `index` of a call on its own."""
        return self if self.seeds is None else replace(self, seed=self.seeds[index], seeds=None)

    def for_prompts(self, start: int, stop: int) -> "SamplingParams":
        """The settings of prompts [start, stop) of a call, as a call of their own."""
        return self if self.seeds is None else replace(self, seeds=self.seeds[start:stop])


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the `top` alternatives as (token id, text, log-probability)."""

    id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One sampled continuation of a prompt, as an engine returns it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None
    # "stop" covers two ends: the model ended its turn (an end-of-turn token), or a stop string was met.
    # True / False say which; None where the engine cannot tell (a server that does not report it).
    ended_turn: bool | None = None
    # One entry per generated token (the end-of-turn token included) when SamplingParams.logprobs asked for them.
    logprobs: list[TokenLogprob] | None = None

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)


@dataclass
class StreamDelta:
    """A piece of text for sample `index`; the last event for a sample carries its `completion`."""

    index: int
    text: str
    completion: Completion | None = None


@dataclass
class Candidate:
    """One chain a strategy produced, with its extracted answer and how it was judged."""

    text: str
    answer: str | None
    answer_method: str | None
    finish_reason: FinishReason
    usage: Usage
    score: float | None = None
    votes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usage"] = self.usage.to_dict()
        return d


@dataclass
class Result:
    """What every strategy returns, and what every surface (CLI, API, server, eval) shows."""

    question: str
    answer: str | None
    answer_method: str | None  # "boxed", or a fallback: "answer-is", "last-number"
    reasoning: str
    content: str  # the closing statement that holds the answer
    text: str  # the raw text of the chosen chain
    finish_reason: FinishReason
    usage: Usage
    seconds: float
    strategy: str = "cot"
    model: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # strategy-specific: votes, tree, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "answer_method": self.answer_method,
            "reasoning": self.reasoning,
            "content": self.content,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "seconds": round(self.seconds, 3),
            "strategy": self.strategy,
            "model": self.model,
            "candidates": [c.to_dict() for c in self.candidates],
            "details": self.details,
        }


@dataclass
class Event:
    """What a running solve reports as it goes, for the CLI, server and UI to show.

    kinds: "delta" (text for candidate `index`), "candidate_started", "candidate_finished",
    "progress" (strategy-specific data such as votes so far), "result" (the final `result`).
    """

    kind: str
    index: int = 0
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    result: Result | None = None
