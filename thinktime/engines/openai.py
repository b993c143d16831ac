"""The OpenAI-compatible engine: any `/v1` server (vLLM serve, SGLang, LMDeploy, Ollama, the DeepSeek API,
thinktime's own server) behind the same protocol as the local engines.

What it does with a server:

* **Samples.** One request with `n` where the server supports it; where it rejects `n` (an HTTP
  400 that names it) or silently returns fewer choices (Ollama), the missing samples are asked
  for as parallel requests with `n=1`, sample `i` seeded `seed + i` (as vLLM seeds its children).
  At most `max_parallel` requests are in flight per engine.
* **Streaming, always.** Every request streams (`stream_options.include_usage`), so `stream()`
  yields text as the server makes it and a cancel event shuts the connection down at once, even
  while the server is silent (the server stops generating), and keeps the text made so far, for
  `generate()` as well. A 200 that carries no completion (an HTML page, only [DONE], an error
  object) is an error that says what came; a whole `chat.completion` body is read as one.
* **Retries** with exponential backoff and jitter (honouring `Retry-After`, up to a minute) on 429,
  5xx, dropped connections and streams that stop before [DONE], until text has reached the caller;
  after that a failure is an error.
* **Reasoning.** Servers that split thinking out (`reasoning_content`, or `reasoning`) get it
  folded back as `<think>reasoning</think>answer`, so `thinktime.reasoning.split_reasoning`
  separates it again exactly as for a local model that thinks in tags.
* **Token counts** come from the server's `usage`. With `n > 1` a server reports one total for
  all samples: it is shared among them in proportion to their text length (the sum is exact).
  `count_tokens` uses the local tokenizer when one is given, else the server's `/tokenize`
  (vLLM, SGLang, thinktime), else an estimate of 4 characters per token.
* **Continuing a partial reply** (`Prompt.prefix`): with a local `tokenizer` the prompt is
  rendered exactly as the local engines render it and sent to `/completions`; without one the
  chat request carries the prefix as a final assistant message with `continue_final_message`
  (vLLM, SGLang, thinktime); `continuation="prefix"` uses the DeepSeek API's `prefix: true` (its
  `/beta` base URL). Servers that support none of these cannot continue a prefix.
"""
from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures import wait as futures_wait

from thinktime import models
from thinktime.engines.base import Engine, refuse_logprobs
from thinktime.engines.chat import render_chat
from thinktime.errors import BadInputError, EngineError
from thinktime.reasoning import THINK_CLOSE, THINK_OPEN
from thinktime.threads import iterate_in_thread
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
CONTINUATIONS = ("auto", "completions", "continue_final_message", "prefix")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _NotSupported(Exception):
    """The server rejected a feature (n > 1); the caller falls back."""


class _Choice:
    """One sample's pieces as they stream in. The text is exactly what was streamed, in order, so a
    stream's reader and the final completion always agree."""

    __slots__ = ("pieces", "finish_reason", "thinking_open", "thinking_closed", "has_content", "stop_reason")

    def __init__(self):
        self.pieces: list[str] = []
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

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
                 source: str | None = None, tokenizer: str | None = None, max_parallel: int = 8,
                 timeout: float = 600.0, max_retries: int = 5, supports_n: bool | None = None,
                 continuation: str = "auto", extra_body: dict | None = None):
        del dtype, source  # the server decides; accepted so every engine takes the same options
        if continuation not in CONTINUATIONS:
            raise BadInputError(f"unknown continuation mode {continuation!r}", hint=f"use one of {CONTINUATIONS}")
        if max_parallel < 1:
            raise BadInputError("max_parallel must be at least 1")
        self.base_url = normalise_base_url(base_url or os.environ.get("THINKTIME_BASE_URL")
                                           or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        self.api_key = api_key if api_key is not None else (os.environ.get("THINKTIME_API_KEY")
                                                            or os.environ.get("OPENAI_API_KEY"))
        self.device = device or "remote"
        self.timeout = timeout
        self.max_retries = max_retries
        self.supports_n = supports_n
        self.continuation = continuation
        self.extra_body = dict(extra_body or {})
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="thinktime-http")
        self._estimated_warned = False
        self._tokenize_ok: bool | None = None

        served = self._served_models()
        self.model_name, info = self._pick_model(model, served)
        self.context_length = next((info[k] for k in ("max_model_len", "context_length", "context_window")
                                    if isinstance(info.get(k), int)), None)
        self.spec = _spec_for(model) or _spec_for(self.model_name)
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            path = models.resolve(tokenizer, download=False).path
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    # --- the protocol -------------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        """With a local tokenizer: exactly what the model sees. Without: a readable transcript (the
        server applies its own chat template)."""
        if self.tokenizer is not None:
            return render_chat(self.tokenizer, prompt)
        return "".join(f"{m['role']}: {m['content']}\n" for m in prompt.messages) + "assistant: " + prompt.prefix

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False).input_ids)
        if self._tokenize_ok is not False:
            try:
                body = self._post_json(self._root_url() + "/tokenize",
                                       {"model": self.model_name, "prompt": text, "add_special_tokens": False})
                count = int(body.get("count", len(body.get("tokens", []))))
                if text and count < 1:  # e.g. llama.cpp, which reads `content`, not `prompt`: no count here
                    raise ValueError("no tokens counted")
                self._tokenize_ok = True
                return count
            except (EngineError, ValueError, TypeError, AttributeError):
                self._tokenize_ok = False
        if not self._estimated_warned:
            self._estimated_warned = True
            log.warning("%s has no /tokenize endpoint and no local tokenizer was given: token counts of "
                        "arbitrary text are estimated (4 characters per token); pass tokenizer= for exact ones",
                        self.base_url)
        return max(1, round(len(text) / 4)) if text else 0

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        refuse_logprobs(self, params)
        if not prompts:
            return []
        cancel = cancel or threading.Event()
        if len(prompts) == 1:
            return [self._sample(prompts[0], params.for_prompt(0), cancel, None)]
        siblings = threading.Event()  # set by a cancel, or by one prompt's failure: the others stop too
        outer = ThreadPoolExecutor(min(len(prompts), 64), thread_name_prefix="thinktime-prompt")
        try:
            futures = {k: outer.submit(self._sample, p, params.for_prompt(k), siblings, None)
                       for k, p in enumerate(prompts)}
            results = _gather(futures, cancel, siblings)
        finally:
            outer.shutdown(wait=False)
        return [results.get(k) or [Completion("", "cancelled", 0, 0) for _ in range(params.n)]
                for k in range(len(prompts))]

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        refuse_logprobs(self, params)
        cancel = cancel or threading.Event()

        def work(emit) -> None:
            # A consumer that stops early sets `cancel`: the connections close and the server stops.
            for index, completion in enumerate(self._sample(prompt, params.for_prompt(0), cancel,
                                                            lambda i, text: emit(StreamDelta(i, text)))):
                emit(StreamDelta(index, "", completion))

        yield from iterate_in_thread(work, cancel, name="thinktime-openai-stream")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- sampling -----------------------------------------------------------------------------

    def _sample(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event,
                on_delta: Callable[[int, str], None] | None) -> list[Completion]:
        """`params.n` completions of one prompt: one request with n, parallel n=1 requests for what is missing."""
        n = params.n
        done: dict[int, Completion] = {}
        if n == 1 or self.supports_n is not False:
            try:
                done.update(_result(self._pool.submit(self._request, prompt, params, n, params.seed, 0, cancel,
                                                      on_delta), cancel))
            except _NotSupported:
                self.supports_n = False
            if n > 1 and done and not cancel.is_set():  # remembered: later calls skip the probe
                self.supports_n = len(done) >= n
        missing = [i for i in range(n) if i not in done]
        if missing and not cancel.is_set():
            siblings = threading.Event()  # set by a cancel, or by one request's failure: the others stop too
            futures = {i: self._pool.submit(self._request, prompt, params, 1,
                                            None if params.seed is None else params.seed + i, i, siblings, on_delta)
                       for i in missing}
            for result in _gather(futures, cancel, siblings).values():
                done.update(result)
        for i in range(n):  # cancelled before the request started
            done.setdefault(i, Completion("", "cancelled", 0, 0))
        return [done[i] for i in range(n)]

    def _body(self, prompt: Prompt, params: SamplingParams, n: int, seed: int | None) -> tuple[str, dict]:
        body: dict = {"model": self.model_name, "max_tokens": params.max_new_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}
        if params.greedy:
            body["temperature"] = 0.0
        else:
            body.update(temperature=params.temperature, top_p=params.top_p)
        if n != 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        if params.stop:
            body["stop"] = list(params.stop)
        body.update(self.extra_body)
        messages = [dict(m) for m in prompt.messages]
        if not prompt.prefix:
            return "/chat/completions", {**body, "messages": messages}
        mode = self.continuation
        if mode == "auto":
            mode = "completions" if self.tokenizer is not None else "continue_final_message"
        if mode == "completions":
            if self.tokenizer is None:
                raise BadInputError("continuing a reply through /completions needs the model's tokenizer",
                                    hint="pass tokenizer= (an alias or folder) to the openai engine")
            return "/completions", {**body, "prompt": self.render(prompt)}
        if mode == "prefix":  # the DeepSeek API (beta): the last assistant message is a prefix
            return "/chat/completions", {**body, "messages": messages + [
                {"role": "assistant", "content": prompt.prefix, "prefix": True}]}
        return "/chat/completions", {**body, "messages": messages + [{"role": "assistant", "content": prompt.prefix}],
                                     "continue_final_message": True, "add_generation_prompt": False}

    def _request(self, prompt: Prompt, params: SamplingParams, n: int, seed: int | None, offset: int,
                 cancel: threading.Event, on_delta: Callable[[int, str], None] | None) -> dict[int, Completion]:
        """One streaming request (retried while nothing has reached the caller); choices keyed offset + index."""
        import requests

        path, body = self._body(prompt, params, n, seed)
        emitted = False

        def emit(index: int, text: str) -> None:
            nonlocal emitted
            if text and on_delta is not None:
                emitted = True
                on_delta(offset + index, text)

        attempt = 0
        while True:
            choices: dict[int, _Choice] = {}
            usage: dict = {}
            try:
                response = self._open(path, body, cancel)
                if response is None:  # cancelled while waiting to retry
                    return {}
                stream = _EventStream(response)
                try:
                    with _aborted_on(cancel, response):
                        if stream.is_json:  # a server that ignores stream: true answers with one JSON object
                            chunks = [_as_chunk(stream.json_body())]
                        else:
                            chunks = stream
                        for chunk in chunks:
                            if cancel.is_set():
                                break
                            usage = self._read_chunk(chunk, choices, emit) or usage
                except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
                    if cancel.is_set():
                        pass  # we cut the connection ourselves: reading a shut socket fails in any of these ways
                    elif isinstance(exc, requests.RequestException):  # the connection dropped mid-stream
                        raise _Retryable(f"the stream broke off ({type(exc).__name__})") from None
                    else:
                        raise
                finally:
                    response.close()
                if not cancel.is_set():
                    self._check_complete(stream, choices, path)
                break
            except _Retryable as exc:
                attempt += 1
                if emitted or attempt > self.max_retries or cancel.is_set():
                    raise EngineError(f"{self.base_url}{path} failed: {exc}",
                                      hint="check that the server is up and not overloaded") from None
                log.info("%s%s: %s; retry %d of %d", self.base_url, path, exc, attempt, self.max_retries)
                _sleep(exc.retry_after, attempt, cancel)
        for choice in choices.values():  # the stream ended without a finish reason: we closed it
            if choice.finish_reason is None:
                choice.finish_reason = "cancelled" if cancel.is_set() else "length"
        return self._completions(prompt, choices, usage, offset, bool(params.stop))

    def _read_chunk(self, chunk, choices: dict[int, "_Choice"], emit) -> dict | None:
        """One streamed chunk into the choices; returns its usage, if it carries one."""
        if not isinstance(chunk, dict):
            raise EngineError(f"{self.base_url} sent an event that is not a JSON object: {str(chunk)[:200]}")
        if chunk.get("error") or chunk.get("object") == "error":  # OpenAI's form, and FastChat's / LMDeploy's
            raise EngineError(f"{self.base_url} reported an error: {_error_text(chunk.get('error') or chunk)}")
        try:
            for item in chunk.get("choices") or ():
                index = int(item.get("index") or 0)
                choice = choices.setdefault(index, _Choice())
                delta = item.get("delta") or item.get("message") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    emit(index, choice.add_reasoning(reasoning))
                text = delta.get("content") if ("delta" in item or "message" in item) else item.get("text")
                if text:
                    emit(index, choice.add_content(text))
                if item.get("finish_reason") == "error":  # the server gave up on this sample
                    raise _Retryable("the server ended a sample with finish_reason 'error'")
                if item.get("finish_reason"):
                    for key in ("stop_reason", "matched_stop"):  # vLLM's and SGLang's: the stop string, or
                        if key in item:                          # None / a token id for an end-of-turn token
                            choice.stop_reason = (item[key],)
                    emit(index, choice.close(_finish(item["finish_reason"])))
        except (AttributeError, TypeError, ValueError) as exc:
            raise EngineError(f"{self.base_url} sent a chunk this engine cannot read ({type(exc).__name__}): "
                              f"{json.dumps(chunk)[:200]}") from None
        usage = chunk.get("usage")
        return usage if isinstance(usage, dict) and usage else None

    def _check_complete(self, stream: "_EventStream", choices: dict[int, "_Choice"], path: str) -> None:
        """After a stream that was not cancelled: a 200 that carried no completion, or a stream that stopped
        before its end, is a failure, never an empty or cut answer passed off as finished."""
        if not choices:
            what = ("its body was not a chat completion" if stream.is_json else
                    f"it sent no completion events ({stream.describe()})")
            raise EngineError(f"{self.base_url}{path} answered 200, but {what}",
                              hint="is this an OpenAI-compatible /v1 URL that streams (server-sent events)?")
        if not stream.done and any(c.finish_reason is None for c in choices.values()):
            raise _Retryable("the stream ended before [DONE], with a sample unfinished")

    def _completions(self, prompt: Prompt, choices: dict[int, _Choice], usage: dict,
                     offset: int, stop_strings: bool = False) -> dict[int, Completion]:
        texts = {i: c.text for i, c in choices.items()}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            prompt_tokens = self.count_tokens(self.render(prompt))
        total = usage.get("completion_tokens")
        if total is None:
            counts = {i: self.count_tokens(t) for i, t in texts.items()}
        else:
            counts = _share(int(total), {i: len(t) for i, t in texts.items()})
        return {offset + i: Completion(texts[i], choices[i].finish_reason, int(prompt_tokens), counts[i],
                                       ended_turn=_ended_turn(choices[i], stop_strings))
                for i in sorted(choices)}

    # --- HTTP ---------------------------------------------------------------------------------

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def _root_url(self) -> str:
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def _open(self, path: str, body: dict, cancel: threading.Event):
        """POST a streaming request; returns the open response, raises _Retryable or EngineError."""
        import requests

        if cancel.is_set():
            return None
        try:
            response = self._session().post(self.base_url + path, json=body, stream=True,
                                            timeout=(10, self.timeout))
        except requests.Timeout as exc:
            raise _Retryable(f"no answer within the engine's timeout ({type(exc).__name__}; the openai engine's "
                             f"timeout= is {self.timeout:g} s)") from None
        except requests.ConnectionError as exc:
            raise _Retryable(f"cannot reach the server ({type(exc).__name__})") from None
        if response.status_code == 200:
            return response
        text = response.text
        response.close()
        if response.status_code in (400, 422, 500) and body.get("n", 1) > 1 and _mentions_n(text):
            raise _NotSupported(text)  # llama.cpp refuses n with a 500 in some builds
        if response.status_code == 429 and "insufficient_quota" in text:  # not transient: retrying cannot help
            raise _http_error(self.base_url + path, response.status_code, text, self.model_name)
        if response.status_code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}: {_error_text(text)}",
                             retry_after=response.headers.get("Retry-After"))
        raise _http_error(self.base_url + path, response.status_code, text, self.model_name)

    def _post_json(self, url: str, body: dict) -> dict:
        import requests

        try:
            response = self._session().post(url, json=body, timeout=(10, 60))
        except requests.RequestException as exc:
            raise EngineError(f"cannot reach {url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise _http_error(url, response.status_code, response.text, self.model_name)
        try:
            body = response.json()
        except ValueError:
            raise EngineError(f"{url} did not answer with JSON") from None
        if not isinstance(body, dict):
            raise EngineError(f"{url} did not answer with a JSON object")
        return body

    def _served_models(self) -> list[dict] | None:
        """The server's /models list; None when the server has no such endpoint."""
        import requests

        url = self.base_url + "/models"
        for attempt in range(1, 4):
            try:
                response = self._session().get(url, timeout=(10, 60))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == 3:
                    raise EngineError(f"cannot reach the model server at {self.base_url} ({type(exc).__name__})",
                                      hint="start the server, or point --base-url at it "
                                           "(e.g. http://127.0.0.1:8000/v1)") from None
                time.sleep(0.5 * attempt)
                continue
            if response.status_code == 404:
                return None
            if response.status_code in _RETRY_STATUS and attempt < 3:
                time.sleep(0.5 * attempt)
                continue
            if response.status_code != 200:
                raise _http_error(url, response.status_code, response.text, None)
            try:
                return list(response.json().get("data") or [])
            except ValueError:
                raise EngineError(f"{url} did not answer with JSON: is this an OpenAI-compatible /v1 URL?",
                                  hint="the base URL usually ends in /v1") from None
        return None

    @staticmethod
    def _pick_model(model: str | None, served: list[dict] | None) -> tuple[str, dict]:
        if served is None:  # no /models endpoint: trust the caller
            if not model:
                raise BadInputError("this server does not list its models: name one with --model")
            return model, {}
        ids = {m.get("id"): m for m in served if m.get("id")}
        if not ids:
            raise EngineError("the server lists no models", hint="load a model into the server first")
        if not model:
            first = next(iter(ids))
            return first, ids[first]
        if model in ids:
            return model, ids[model]
        spec = models.ALIASES.get(model.lower())
        for candidate in (spec.hf_repo if spec else None, model.split("/")[-1]):
            for served_id in ids:
                if candidate and served_id.lower() in (candidate.lower(), candidate.split("/")[-1].lower()):
                    return served_id, ids[served_id]
        raise BadInputError(f"the server does not serve {model!r}",
                            hint=f"it serves: {', '.join(ids)}; pass one of them with --model, or leave --model out")


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def normalise_base_url(url: str) -> str:
    """`host:port`, `http://host:port` or `http://host:port/v1` -> `http://host:port/v1` (paths kept)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    if "/" not in rest:  # no path given: the OpenAI convention
        url += "/v1"
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


class _EventStream:
    """Server-sent events: one JSON value per `data:` line until [DONE]; remembers whether [DONE] came and
    what else the body held, so that a 200 without completions can be told apart from a finished stream."""

    def __init__(self, response):
        self.response = response
        self.done = False
        self.malformed = 0
        self.other: list[bytes] = []  # the first lines that were neither events nor SSE comments
        self.is_json = response.headers.get("content-type", "").split(";")[0].strip() == "application/json"

    def __iter__(self) -> Iterator:
        for raw in self.response.iter_lines(decode_unicode=False):
            if not raw or raw.startswith(b":"):  # blank lines and comments (keep-alives)
                continue
            if not raw.startswith(b"data:"):
                if len(self.other) < 3:
                    self.other.append(raw[:120])
                continue
            data = raw[5:].strip()
            if data == b"[DONE]":
                self.done = True
                return
            try:
                yield json.loads(data)
            except ValueError:
                self.malformed += 1

    def json_body(self):
        try:
            return self.response.json()
        except ValueError:
            return None

    def describe(self) -> str:
        if self.malformed:
            return f"{self.malformed} data lines that were not JSON"
        if self.other:
            return "other text: " + " | ".join(line.decode("utf-8", "replace") for line in self.other)
        return "[DONE] only" if self.done else "an empty body"


def _as_chunk(body) -> dict:
    """A whole chat.completion as one chunk: its choices' `message` read as deltas, finished, with its usage."""
    if not isinstance(body, dict):
        return {"choices": []}
    if "choices" not in body:
        return body  # an error object, or something else: _read_chunk says what
    return {"choices": [{**item, "finish_reason": item.get("finish_reason") or "stop"}
                        for item in body.get("choices") or () if isinstance(item, dict)],
            "usage": body.get("usage")}


@contextlib.contextmanager
def _aborted_on(cancel: threading.Event, response):
    """While the body is read: a cancel shuts the connection's socket down at once, which unblocks a read
    waiting on a silent server (closing the response from another thread would not), so the server stops too."""
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            if cancel.wait(0.05):
                _shut_down(response)
                return

    watcher = threading.Thread(target=watch, name="thinktime-http-cancel", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


def _shut_down(response) -> None:
    import socket

    connection = getattr(response.raw, "_connection", None) or getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    response.close()


def _result(future, cancel: threading.Event, grace: float = 2.0):
    """A request's result; once cancelled, at most `grace` seconds more (a server silent before its headers
    cannot be interrupted: its request is left to end in the background, and its samples count as cancelled)."""
    while True:
        try:
            return future.result(timeout=0.05)
        except FuturesTimeout:
            if cancel.is_set():
                try:
                    return future.result(timeout=grace)
                except FuturesTimeout:
                    return {}


def _gather(futures: dict, cancel: threading.Event, siblings: threading.Event, grace: float = 2.0) -> dict:
    """Each future's result by key. The futures run under `siblings`: a cancel is passed on to it, and so is
    the first failure, which is raised once the others have stopped (so a failed sample does not leave its
    siblings' requests running for minutes). Once stopping, at most `grace` seconds more; a request still
    running then (a server silent before its headers) is left to end in the background, without a result."""
    pending, results = dict(futures), {}
    error: BaseException | None = None
    deadline = None
    while pending:
        if cancel.is_set():
            siblings.set()
        finished, _ = futures_wait(list(pending.values()), timeout=0.05, return_when=FIRST_COMPLETED)
        for key in [k for k, f in pending.items() if f in finished]:
            try:
                results[key] = pending.pop(key).result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the siblings stop
                error = error or exc
                siblings.set()
        if siblings.is_set():
            deadline = deadline or time.monotonic() + grace
            if time.monotonic() > deadline:
                break
    if error is not None:
        raise error
    return results


def _ended_turn(choice: _Choice, stop_strings: bool) -> bool | None:
    """Whether the model ended its turn: what the server says, or sure when no stop string was asked for."""
    if choice.finish_reason != "stop":
        return False
    if choice.stop_reason is not None:
        return not isinstance(choice.stop_reason[0], str)
    return None if stop_strings else True


def _finish(reason: str) -> str:
    return {"stop": "stop", "eos": "stop", "length": "length", "abort": "cancelled"}.get(reason, "stop")


def _share(total: int, weights: dict[int, int]) -> dict[int, int]:
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


_MAX_RETRY_AFTER = 60.0  # a longer Retry-After is a server asking for minutes: better to fail and say so


def _sleep(retry_after: str | None, attempt: int, cancel: threading.Event) -> None:
    try:
        delay = float(retry_after) if retry_after else 0.0
    except ValueError:  # the HTTP-date form
        try:
            delay = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError):
            delay = 0.0
    delay = min(_MAX_RETRY_AFTER, max(delay, min(30.0, 0.5 * 2 ** (attempt - 1)))) * (1 + random.random() * 0.25)
    cancel.wait(delay)


def _error_text(payload) -> str:
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return payload.strip()[:300] or "(empty body)"
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)[:300]
        if isinstance(inner, str):
            return inner[:300]
        if "detail" in payload:
            return str(payload["detail"])[:300]
    return str(payload)[:300]


def _mentions_n(text: str) -> bool:
    message = _error_text(text).lower()
    return any(k in message for k in ("'n'", '"n"', " n ", "n must", "n>1", "n > 1", "parameter n", "`n`",
                                      "n should", "best_of", "multiple choices", "n=", "field n",
                                      "one completion choice", "only one choice"))


def _http_error(url: str, status: int, text: str, model: str | None) -> EngineError | BadInputError:
    message = _error_text(text)
    if status in (400, 413, 422):  # the server found the request itself wrong: bad input, not a failing engine
        return BadInputError(f"{url} refused the request (HTTP {status}): {message}",
                             hint="the server's message says what it refused (a prompt over its context, "
                                  "a setting or feature it lacks)")
    if status in (401, 403):
        return EngineError(f"{url} refused the API key (HTTP {status}): {message}",
                           hint="pass --api-key, or set THINKTIME_API_KEY / OPENAI_API_KEY")
    if status == 404:
        return EngineError(f"{url} was not found (HTTP 404): {message}",
                           hint="check --base-url (it usually ends in /v1)" + (f" and --model ({model})" if model else ""))
    return EngineError(f"{url} answered HTTP {status}: {message}")


def _spec_for(name: str | None) -> models.ModelSpec | None:
    """The alias behind a served model id (so think-tag models get their prompt), if any."""
    if not name:
        return None
    lowered = name.lower()
    for spec in models.ALIASES.values():
        if lowered in (spec.alias, (spec.hf_repo or "").lower(), (spec.hf_repo or "").split("/")[-1].lower()):
            return spec
    return None
