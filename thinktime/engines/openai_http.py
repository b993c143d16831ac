"""The OpenAI engine's HTTP layer: a requests session per thread, streaming POSTs whose failures are told apart
(retryable, `n` not supported, final), server-sent events, the cancel watchdog, and backoff between retries."""
from __future__ import annotations

import contextlib
import email.utils
import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures import wait as futures_wait

from thinktime.errors import BadInputError, EngineError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class NotSupported(Exception):
    """The server rejected a feature (n > 1); the caller falls back."""


class Retryable(Exception):
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


class HttpClient:
    """One server's HTTP side; the engine keeps the protocol (bodies, chunks, completions)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        self.base_url, self.api_key, self.timeout = base_url, api_key, timeout
        self._local = threading.local()

    def session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def root_url(self) -> str:
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def open(self, path: str, body: dict, cancel: threading.Event, model_name: str | None):
        """POST a streaming request; returns the open response, raises Retryable or EngineError."""
        import requests

        if cancel.is_set():
            return None
        try:
            response = self.session().post(self.base_url + path, json=body, stream=True,
                                            timeout=(10, self.timeout))
        except requests.Timeout as exc:
            raise Retryable(f"no answer within the engine's timeout ({type(exc).__name__}; the openai engine's "
                             f"timeout= is {self.timeout:g} s)") from None
        except requests.ConnectionError as exc:
            raise Retryable(f"cannot reach the server ({type(exc).__name__})") from None
        if response.status_code == 200:
            return response
        text = response.text
        response.close()
        if response.status_code in (400, 422, 500) and body.get("n", 1) > 1 and mentions_n(text):
            raise NotSupported(text)  # llama.cpp refuses n with a 500 in some builds
        if response.status_code == 429 and "insufficient_quota" in text:  # not transient: retrying cannot help
            raise http_error(self.base_url + path, response.status_code, text, model_name)
        if response.status_code in RETRY_STATUS:
            raise Retryable(f"HTTP {response.status_code}: {error_text(text)}",
                             retry_after=response.headers.get("Retry-After"))
        raise http_error(self.base_url + path, response.status_code, text, model_name)

    def post_json(self, url: str, body: dict, model_name: str | None) -> dict:
        import requests

        try:
            response = self.session().post(url, json=body, timeout=(10, 60))
        except requests.RequestException as exc:
            raise EngineError(f"cannot reach {url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise http_error(url, response.status_code, response.text, model_name)
        try:
            body = response.json()
        except ValueError:
            raise EngineError(f"{url} did not answer with JSON") from None
        if not isinstance(body, dict):
            raise EngineError(f"{url} did not answer with a JSON object")
        return body

    def served_models(self) -> list[dict] | None:
        """The server's /models list; None when the server has no such endpoint."""
        import requests

        url = self.base_url + "/models"
        for attempt in range(1, 4):
            try:
                response = self.session().get(url, timeout=(10, 60))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == 3:
                    raise EngineError(f"cannot reach the model server at {self.base_url} ({type(exc).__name__})",
                                      hint="start the server, or point --base-url at it "
                                           "(e.g. http://127.0.0.1:8000/v1)") from None
                time.sleep(0.5 * attempt)
                continue
            if response.status_code == 404:
                return None
            if response.status_code in RETRY_STATUS and attempt < 3:
                time.sleep(0.5 * attempt)
                continue
            if response.status_code != 200:
                raise http_error(url, response.status_code, response.text, None)
            try:
                return list(response.json().get("data") or [])
            except ValueError:
                raise EngineError(f"{url} did not answer with JSON: is this an OpenAI-compatible /v1 URL?",
                                  hint="the base URL usually ends in /v1") from None
        return None


class EventStream:
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


def as_chunk(body) -> dict:
    """A whole chat.completion as one chunk: its choices' `message` read as deltas, finished, with its usage."""
    if not isinstance(body, dict):
        return {"choices": []}
    if "choices" not in body:
        return body  # an error object, or something else: _read_chunk says what
    return {"choices": [{**item, "finish_reason": item.get("finish_reason") or "stop"}
                        for item in body.get("choices") or () if isinstance(item, dict)],
            "usage": body.get("usage")}


@contextlib.contextmanager
def aborted_on(cancel: threading.Event, response):
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


def result_within(future, cancel: threading.Event, grace: float = 2.0):
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


def gather(futures: dict, cancel: threading.Event, siblings: threading.Event, grace: float = 2.0) -> dict:
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


_MAX_RETRY_AFTER = 60.0  # a longer Retry-After is a server asking for minutes: better to fail and say so


def backoff(retry_after: str | None, attempt: int, cancel: threading.Event) -> None:
    try:
        delay = float(retry_after) if retry_after else 0.0
    except ValueError:  # the HTTP-date form
        try:
            delay = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError):
            delay = 0.0
    delay = min(_MAX_RETRY_AFTER, max(delay, min(30.0, 0.5 * 2 ** (attempt - 1)))) * (1 + random.random() * 0.25)
    cancel.wait(delay)


def error_text(payload) -> str:
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


def mentions_n(text: str) -> bool:
    message = error_text(text).lower()
    return any(k in message for k in ("'n'", '"n"', " n ", "n must", "n>1", "n > 1", "parameter n", "`n`",
                                      "n should", "best_of", "multiple choices", "n=", "field n",
                                      "one completion choice", "only one choice"))


def http_error(url: str, status: int, text: str, model: str | None) -> EngineError | BadInputError:
    message = error_text(text)
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
