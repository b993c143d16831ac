"""One vLLM sample as its outputs arrive: text, token ids, finish, and its tokens' log-probabilities.

vLLM returns, per generated token, a dict of token id -> Logprob(logprob, rank, decoded_token) holding the
`logprobs` most likely tokens (ranks 1..k) and the sampled one (whatever its rank). With vLLM's default
`logprobs_mode` ("raw_logprobs") these are the model's own distribution, before temperature and top-p, as
the other engines return them.
"""
from __future__ import annotations

from collections.abc import Callable

from thinktime.types import Completion, TokenLogprob


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
    """One sample's text and tokens as they arrive."""

    __slots__ = ("parts", "token_ids", "finish_reason", "ended_turn", "logprobs")

    def __init__(self):
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
