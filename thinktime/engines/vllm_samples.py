"""A vLLM request of a call, and one sample as its outputs arrive: text, token ids, finish, and its tokens'
log-probabilities.

vLLM returns, per generated token, a dict of token id -> Logprob(logprob, rank, decoded_token) holding the
`logprobs` most likely tokens (ranks 1..k) and the sampled one (whatever its rank). With vLLM's default
`logprobs_mode` ("raw_logprobs") these are the model's own distribution, before temperature and top-p, as
the other engines return them.
"""
from __future__ import annotations

import queue
from collections.abc import Callable

from thinktime.confidence import RunningGroup
from thinktime.types import Completion, TokenLogprob


class Request:
    """One request of a call: prompt `row`'s samples `indices` (all of them, or one where samples are requests of
    their own); its outputs go to the queue of the call that submitted it, under its `position` in the call."""

    __slots__ = ("id", "position", "row", "indices", "engine_input", "params", "out")

    def __init__(self, request_id: str, position: int, row: int, indices: tuple[int, ...], engine_input, params,
                 out: queue.Queue):
        self.id, self.position, self.row, self.indices = request_id, position, row, indices
        self.engine_input, self.params, self.out = engine_input, params, out

    def targets(self, output_index: int) -> tuple[int, ...]:
        """The samples an output fills: greedy asks vLLM for one sample, and the row's samples are its copies."""
        return self.indices if self.params.n < len(self.indices) else (self.indices[output_index],)


def token_entries(positions, token_ids, top: int, text_of: Callable[[int], str]) -> list[TokenLogprob]:
    """vLLM's per-token dicts (one per id in `token_ids`) as entries with the `top` alternatives, best first."""
    entries = []
    for token, position in zip(token_ids, positions):
        ranked = sorted(((lp.rank, i, lp) for i, lp in position.items() if lp.rank is not None and lp.rank <= top),
                        key=lambda item: item[0])
        entries.append(TokenLogprob(token, _text(position[token], token, text_of), position[token].logprob,
                                    [(i, _text(lp, i, text_of), lp.logprob) for _, i, lp in ranked]))
    return entries


def _text(logprob, token: int, text_of: Callable[[int], str]) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else text_of(token)


class Sample:
    """One sample's text and tokens as they arrive; `unsure` once its running confidence fell below `stop_below`'s
    floor (DeepConf's early stop)."""

    __slots__ = ("parts", "token_ids", "finish_reason", "ended_turn", "logprobs", "group", "floor", "unsure")

    def __init__(self, stop_below: tuple[int, float] | None = None):
        self.group = RunningGroup(stop_below[0]) if stop_below else None
        self.floor = stop_below[1] if stop_below else None
        self.unsure = False
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.ended_turn = False
        self.logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, text: str, token_ids, logprobs: list[TokenLogprob] | None = None) -> None:
        if text:
            self.parts.append(text)
        self.token_ids.extend(token_ids)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
            for entry in logprobs if self.group is not None and not self.unsure else ():
                mean = self.group.push(entry.top)
                self.unsure = mean is not None and mean < self.floor
                if self.unsure:
                    break

    def finish(self, reason: str, stop_reason=None, stopped: bool = False) -> None:
        self.finish_reason = reason
        # vLLM's stop_reason when it finished with "stop": the stop string met, or None / a token id when a
        # stop token ended the turn
        self.ended_turn = stopped and not isinstance(stop_reason, str)

    def completion(self, prompt_tokens: int, stop_ids) -> Completion:
        ids = list(self.token_ids)
        # The generated end-of-turn token counts as used (as in the transformers engine) but is not text.
        visible = ids[:-1] if ids and ids[-1] in stop_ids else ids
        return Completion("".join(self.parts), self.finish_reason or "cancelled", prompt_tokens, len(ids), visible,
                          self.ended_turn, self.logprobs)
