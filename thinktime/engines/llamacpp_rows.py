"""A row: one sample being decoded, from its sampled tokens to its text, finish reason and Completion.

The scheduler feeds each row the tokens llama.cpp samples for it; the row decides whether it goes
on (the model ended its turn, a stop string appeared, its token limit, a cancel) and, for streams,
which text may be shown already: the characters that could begin a stop string are held back, so
a stop string is never streamed, and a multi-byte character waits for its last byte.
"""
from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field

from thinktime.confidence import RunningGroup
from thinktime.types import Completion, StreamDelta, TokenLogprob


@dataclass
class Request:
    """One prompt's `n` samples, as a caller submitted them."""

    tokens: list[int]
    n: int
    max_new: int
    greedy: bool
    temperature: float
    top_p: float
    seeds: list[int]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token, when log-probabilities are asked for
    stop_below: tuple[int, float] | None = None  # (window, threshold): DeepConf's early stop
    cancel: threading.Event = field(default_factory=threading.Event)  # the caller's
    abort: threading.Event = field(default_factory=threading.Event)  # ours: the rest of a failed call
    emit: object = None  # called with StreamDelta as text arrives (streams), else None
    results: list[Completion | None] = field(default_factory=list)
    admitted: int = 0  # rows handed to the scheduler so far
    finished: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * self.n

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.abort.is_set()

    def finish_row(self, index: int, completion: Completion) -> None:
        self.results[index] = completion
        self.finished += 1
        if self.finished == self.n:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


class Row:
    def __init__(self, request: Request, index: int, seq: int, sampler, piece, is_end_of_turn):
        self.request, self.index, self.seq, self.sampler = request, index, seq, sampler
        self.piece, self.is_end_of_turn = piece, is_end_of_turn
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.pending: int | None = None  # the sampled token to feed at the next step
        self.finish: str | None = None
        self.ended_turn = False
        self.logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self._group = RunningGroup(request.stop_below[0]) if request.stop_below else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._hold = max((len(s) for s in request.stop), default=1) - 1

    @property
    def remaining(self) -> int:
        """New tokens this row may still take (its share of the KV cells the scheduler keeps free)."""
        return self.request.max_new - len(self.ids)

    def take(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token (and its log-probability, when asked for); True while the row goes on."""
        request = self.request
        if request.cancelled:
            self.finish = "cancelled"
            return False
        unsure = False
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            mean = self._group.push(logprob.top) if self._group is not None else None
            unsure = mean is not None and mean < request.stop_below[1]
        if self.is_end_of_turn(token):  # the model ended its turn: counted, not shown
            self.finish, self.ended_turn = "stop", True
        else:
            self.ids.append(token)
            before = len(self.text)
            self.text += self._utf8.decode(self.piece(token))
            if request.stop and self._cut_at_stop(before):
                self.finish = "stop"
            elif len(self.ids) >= request.max_new:
                self.finish = "length"
        if self.finish is None and unsure:  # the chain's recent stretch is below the threshold: it ends here
            self.finish = "low_confidence"
        if self.finish is None:
            self.pending = token
            self._stream(final=False)
            return True
        return False

    def cancel(self) -> None:
        self.finish = "cancelled"

    def _cut_at_stop(self, before: int) -> bool:
        window = self.text[max(0, before - self._hold):]
        found = [i for i in (window.find(s) for s in self.request.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[: max(0, before - self._hold) + min(found)]
        return True

    def _stream(self, final: bool) -> None:
        emit = self.request.emit
        if emit is None:
            return
        end = len(self.text) if final else len(self.text) - self._hold
        if end > self.sent:
            emit(StreamDelta(self.index, self.text[self.sent:end]))
            self.sent = end

    def completion(self) -> Completion:
        used = len(self.ids) + (1 if self.ended_turn else 0)
        text = self.text
        if self.finish in ("length", "cancelled", "low_confidence"):  # a cut character is not text (unless shown)
            text = text[:max(len(text.rstrip("\ufffd")), self.sent)]
        self.text = text
        prompt_tokens = len(self.request.tokens) if self.seq is not None else 0  # a row that never started: none
        completion = Completion(text, self.finish or "cancelled", prompt_tokens, used, list(self.ids),
                                self.ended_turn, self.logprobs)
        if self.request.emit is not None:
            rest = text[self.sent:] if len(text) >= self.sent else ""
            self.request.emit(StreamDelta(self.index, rest, completion))
            self.sent = len(text)
        return completion
