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
* **Log-probabilities**, where the server sends them: `logprobs` / `top_logprobs` on chat requests,
  `logprobs: k` on /completions, read back per token (Completion.logprobs, token ids unknown: -1). Whether
  the server sends them is asked once, with a one-token request, before the first call that wants them;
  a server that does not is refused before anything is generated. With `stop_below` each sample is its own
  request, and its connection is closed once its running confidence falls below the floor (the server
  stops generating), finish_reason "low_confidence".
* **Continuing a partial reply** (`Prompt.prefix`): with a local `tokenizer` the prompt is
  rendered exactly as the local engines render it and sent to `/completions`; without one the
  chat request carries the prefix as a final assistant message with `continue_final_message`
  (vLLM, SGLang, thinktime); `continuation="prefix"` uses the DeepSeek API's `prefix: true` (its
  `/beta` base URL). Servers that support none of these cannot continue a prefix.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from thinktime import models
from thinktime.engines.base import Engine
from thinktime.engines.chat import render_chat
from thinktime.engines.openai_chunks import Choice, check_complete, ended_turn, read_chunk, share
from thinktime.engines.openai_http import (EventStream, HttpClient, NotSupported, Retryable, aborted_on, as_chunk,
                                          backoff, gather, normalise_base_url, result_within)
from thinktime.engines.logprob_checks import check_logprob_params
from thinktime.errors import BadInputError, EngineError
from thinktime.threads import iterate_in_thread
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
CONTINUATIONS = ("auto", "completions", "continue_final_message", "prefix")


class NoLogprobs(EngineError):
    """The server answered without the log-probabilities the request asked for."""


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
        self._http = HttpClient(self.base_url, self.api_key, timeout)
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="thinktime-http")
        self._estimated_warned = False
        self._tokenize_ok: bool | None = None
        self._logprobs_ok: bool | None = None

        served = self._http.served_models()
        self.model_name, info = self._pick_model(model, served)
        self.context_length = next((info[k] for k in ("max_model_len", "context_length", "context_window")
                                    if isinstance(info.get(k), int)), None)
        self.spec = _spec_for(model) or _spec_for(self.model_name)
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            path = models.resolve(tokenizer, download=False).path
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    @property
    def returns_logprobs(self) -> bool:
        """Whether the server sends token log-probabilities: asked once, with a one-token request."""
        if self._logprobs_ok is None:
            probe = Prompt.of([{"role": "user", "content": "Hi"}])
            try:
                [[completion]] = self._generate([probe], SamplingParams(max_new_tokens=1, logprobs=1),
                                                threading.Event())
                self._logprobs_ok = bool(completion.logprobs)
            except (BadInputError, NoLogprobs):  # a 400 (the server refuses the fields), or an answer without them
                self._logprobs_ok = False
        return self._logprobs_ok

    def check_logprobs(self, params: SamplingParams) -> None:
        """Log-probabilities asked of a server that does not send them: refused before anything is generated."""
        if params.logprobs is None and params.stop_below is None:
            return
        check_logprob_params(params)
        if not self.returns_logprobs:
            raise BadInputError(f"the openai engine's server {self.base_url} ({self.model_name}) does not return "
                                f"log-probabilities", hint="serve the model with a server that answers `logprobs` "
                                "(vLLM, SGLang, thinktime serve on the transformers or llamacpp engine)")

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
                body = self._http.post_json(self._http.root_url() + "/tokenize",
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
        self.check_logprobs(params)
        return self._generate(prompts, params, cancel)

    def _generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                  cancel: threading.Event | None) -> list[list[Completion]]:
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
            results = gather(futures, cancel, siblings)
        finally:
            outer.shutdown(wait=False)
        return [results.get(k) or [Completion("", "cancelled", 0, 0) for _ in range(params.n)]
                for k in range(len(prompts))]

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        self.check_logprobs(params)
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
        # A sample that may be stopped on low confidence is a request of its own: closing it stops only it.
        if n == 1 or (self.supports_n is not False and params.stop_below is None):
            try:
                done.update(result_within(self._pool.submit(self._request, prompt, params, n, params.seed, 0, cancel,
                                                      on_delta), cancel))
            except NotSupported:
                self.supports_n = False
            if n > 1 and done and not cancel.is_set():  # remembered: later calls skip the probe
                self.supports_n = len(done) >= n
        missing = [i for i in range(n) if i not in done]
        if missing and not cancel.is_set():
            siblings = threading.Event()  # set by a cancel, or by one request's failure: the others stop too
            futures = {i: self._pool.submit(self._request, prompt, params, 1,
                                            None if params.seed is None else params.seed + i, i, siblings, on_delta)
                       for i in missing}
            for result in gather(futures, cancel, siblings).values():
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
        if params.logprobs is not None:
            body.update(logprobs=True, **({"top_logprobs": params.logprobs} if params.logprobs else {}))
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
            if params.logprobs is not None:  # /completions takes the number of alternatives in `logprobs`
                body = {**{k: v for k, v in body.items() if k != "top_logprobs"}, "logprobs": params.logprobs}
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
            choices: dict[int, Choice] = {}
            usage: dict = {}
            try:
                response = self._http.open(path, body, cancel, self.model_name)
                if response is None:  # cancelled while waiting to retry
                    return {}
                stream = EventStream(response)
                try:
                    with aborted_on(cancel, response):
                        if stream.is_json:  # a server that ignores stream: true answers with one JSON object
                            chunks = [as_chunk(stream.json_body())]
                        else:
                            chunks = stream
                        for chunk in chunks:
                            if cancel.is_set():
                                break
                            usage = read_chunk(self.base_url, chunk, choices, emit, params.stop_below) or usage
                            if n == 1 and choices.get(0) and choices[0].finish_reason == "low_confidence":
                                break  # closing the stream stops the server generating this sample
                except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
                    if cancel.is_set():
                        pass  # we cut the connection ourselves: reading a shut socket fails in any of these ways
                    elif isinstance(exc, requests.RequestException):  # the connection dropped mid-stream
                        raise Retryable(f"the stream broke off ({type(exc).__name__})") from None
                    else:
                        raise
                finally:
                    response.close()
                if not cancel.is_set():
                    check_complete(self.base_url, stream, choices, path)
                break
            except Retryable as exc:
                attempt += 1
                if emitted or attempt > self.max_retries or cancel.is_set():
                    raise EngineError(f"{self.base_url}{path} failed: {exc}",
                                      hint="check that the server is up and not overloaded") from None
                log.info("%s%s: %s; retry %d of %d", self.base_url, path, exc, attempt, self.max_retries)
                backoff(exc.retry_after, attempt, cancel)
        for choice in choices.values():  # the stream ended without a finish reason: we closed it
            if choice.finish_reason is None:
                choice.finish_reason = "cancelled" if cancel.is_set() else "length"
        return self._completions(prompt, choices, usage, offset, params)

    def _completions(self, prompt: Prompt, choices: dict[int, Choice], usage: dict,
                     offset: int, params: SamplingParams) -> dict[int, Completion]:
        texts = {i: c.text for i, c in choices.items()}
        if params.logprobs is not None and any(c.logprobs is None and c.text for c in choices.values()):
            raise NoLogprobs(f"{self.base_url} sent no log-probabilities for a sample that asked for them",
                              hint="the server stopped sending `logprobs`; check its version and settings")
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            prompt_tokens = self.count_tokens(self.render(prompt))
        total = usage.get("completion_tokens")
        if total is None:  # a stream closed early has no usage: the tokens it sent, where it listed them
            counts = {i: len(choices[i].logprobs) if choices[i].logprobs is not None else self.count_tokens(t)
                      for i, t in texts.items()}
        else:
            counts = share(int(total), {i: len(t) for i, t in texts.items()})
        return {offset + i: Completion(texts[i], choices[i].finish_reason, int(prompt_tokens), counts[i],
                                       ended_turn=ended_turn(choices[i], bool(params.stop)),
                                       logprobs=choices[i].logprobs if params.logprobs is not None else None)
                for i in sorted(choices)}

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


def _spec_for(name: str | None) -> models.ModelSpec | None:
    """The alias behind a served model id (so think-tag models get their prompt), if any."""
    if not name:
        return None
    lowered = name.lower()
    for spec in models.ALIASES.values():
        if lowered in (spec.alias, (spec.hf_repo or "").lower(), (spec.hf_repo or "").split("/")[-1].lower()):
            return spec
    return None
