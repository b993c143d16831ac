"""Reading an OpenAI-compatible stream's chunks into choices: reasoning folded back into think tags, finish
reasons mapped to thinktime's, a failed or cut stream told apart from a finished one, usage shared among samples,
token log-probabilities read in chat's (`logprobs.content`) and /completions' (`tokens`, `token_logprobs`) shapes."""
from __future__ import annotations

import json

from thinktime.confidence import RunningGroup
from thinktime.engines.openai_http import EventStream, Retryable, error_text
from thinktime.errors import EngineError
from thinktime.reasoning import THINK_CLOSE, THINK_OPEN
from thinktime.types import TokenLogprob

NO_ID = -1  # OpenAI's API names tokens by their text, not their id


class Choice:
    """One sample's pieces as they stream in. The text is exactly what was streamed, in order, so a
    stream's reader and the final completion always agree."""

    __slots__ = ("pieces", "finish_reason", "thinking_open", "thinking_closed", "has_content", "stop_reason",
                 "logprobs", "group", "floor")

    def __init__(self, stop_below: tuple[int, float] | None = None):
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        # DeepConf's early stop, read as the tokens arrive: the window's running confidence, and its floor
        self.group = RunningGroup(stop_below[0]) if stop_below else None
        self.floor = stop_below[1] if stop_below else None
        self.finish_reason: str | None = None
        self.stop_reason: tuple | None = None  # (what ended it,) where the server says: vLLM, SGLang
        self.thinking_open = False
        self.thinking_closed = False
        self.has_content = False

    def _emit(self, text: str) -> str:
        self.pieces.append(text)
        return text

    def add_reasoning(self, text: str) -> str:
        if not self.thinking_open and not self.has_content:
            self.thinking_open = True
            return self._emit(THINK_OPEN + text)
        # Inside the thinking; or reasoning that a server sent after the answer began, which stays where
        # it came (a second think block would hide the answer before it).
        return self._emit(text)

    def add_content(self, text: str) -> str:
        self.has_content = True
        if self.thinking_open and not self.thinking_closed:
            self.thinking_closed = True
            return self._emit(THINK_CLOSE + text)
        return self._emit(text)

    def close(self, finish_reason: str) -> str:
        """Finish the sample; returns text still owed to a stream (a closing think tag)."""
        self.finish_reason = finish_reason
        if self.thinking_open and not self.thinking_closed and finish_reason == "stop":
            self.thinking_closed = True
            return self._emit(THINK_CLOSE)
        return ""

    def add_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Token entries as they stream in; a sample whose running confidence falls below the floor ends here."""
        self.logprobs = (self.logprobs or []) + entries
        if self.group is None or self.finish_reason is not None:
            return
        for entry in entries:
            mean = self.group.push(entry.top)
            if mean is not None and mean < self.floor:
                self.finish_reason = "low_confidence"
                return

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def token_entries(logprobs) -> list[TokenLogprob]:
    """A choice's `logprobs` field as token entries: chat's `content` list, or /completions' parallel lists."""
    if not logprobs:
        return []
    if "content" in logprobs:
        return [TokenLogprob(NO_ID, t["token"], float(t["logprob"]),
                             [(NO_ID, a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or ()])
                for t in logprobs["content"] or ()]
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or ())
    return [TokenLogprob(NO_ID, token, float(logprob), [(NO_ID, t, float(v)) for t, v in (top or {}).items()])
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)]


def read_chunk(base_url: str, chunk, choices: dict[int, Choice], emit,
               stop_below: tuple[int, float] | None = None) -> dict | None:
    """One streamed chunk into the choices; returns its usage, if it carries one."""
    if not isinstance(chunk, dict):
        raise EngineError(f"{base_url} sent an event that is not a JSON object: {str(chunk)[:200]}")
    if chunk.get("error") or chunk.get("object") == "error":  # OpenAI's form, and FastChat's / LMDeploy's
        raise EngineError(f"{base_url} reported an error: {error_text(chunk.get('error') or chunk)}")
    try:
        for item in chunk.get("choices") or ():
            index = int(item.get("index") or 0)
            choice = choices.setdefault(index, Choice(stop_below))
            delta = item.get("delta") or item.get("message") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                emit(index, choice.add_reasoning(reasoning))
            text = delta.get("content") if ("delta" in item or "message" in item) else item.get("text")
            if text:
                emit(index, choice.add_content(text))
            if item.get("logprobs"):
                choice.add_logprobs(token_entries(item["logprobs"]))
            if item.get("finish_reason") == "error":  # the server gave up on this sample
                raise Retryable("the server ended a sample with finish_reason 'error'")
            if item.get("finish_reason") and choice.finish_reason != "low_confidence":
                for key in ("stop_reason", "matched_stop"):  # vLLM's and SGLang's: the stop string, or
                    if key in item:                          # None / a token id for an end-of-turn token
                        choice.stop_reason = (item[key],)
                emit(index, choice.close(finish_reason_of(item["finish_reason"])))
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise EngineError(f"{base_url} sent a chunk this engine cannot read ({type(exc).__name__}): "
                          f"{json.dumps(chunk)[:200]}") from None
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) and usage else None

def check_complete(base_url: str, stream: EventStream, choices: dict[int, Choice], path: str) -> None:
    """After a stream that was not cancelled: a 200 that carried no completion, or a stream that stopped
    before its end, is a failure, never an empty or cut answer passed off as finished."""
    if not choices:
        what = ("its body was not a chat completion" if stream.is_json else
                f"it sent no completion events ({stream.describe()})")
        raise EngineError(f"{base_url}{path} answered 200, but {what}",
                          hint="is this an OpenAI-compatible /v1 URL that streams (server-sent events)?")
    if not stream.done and any(c.finish_reason is None for c in choices.values()):
        raise Retryable("the stream ended before [DONE], with a sample unfinished")


def ended_turn(choice: Choice, stop_strings: bool) -> bool | None:
    """Whether the model ended its turn: what the server says, or sure when no stop string was asked for."""
    if choice.finish_reason != "stop":
        return False
    if choice.stop_reason is not None:
        return not isinstance(choice.stop_reason[0], str)
    return None if stop_strings else True


def finish_reason_of(reason: str) -> str:
    return {"stop": "stop", "eos": "stop", "length": "length", "abort": "cancelled"}.get(reason, "stop")


def share(total: int, weights: dict[int, int]) -> dict[int, int]:
    """Split `total` among keys in proportion to weights (largest remainder): the parts sum to `total`."""
    if not weights:
        return {}
    if not sum(weights.values()):
        weights = {k: 1 for k in weights}
    scale = sum(weights.values())
    raw = {k: total * w / scale for k, w in weights.items()}
    parts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - parts[k], reverse=True)[: total - sum(parts.values())]:
        parts[k] += 1
    return parts
