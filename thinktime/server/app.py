"""An OpenAI-compatible chat-completions server on top of one Thinker.

Reasoning and answer travel apart, as DeepSeek's API does: `message.reasoning_content` holds the
chain of thought and `message.content` the closing statement; streams send `delta.reasoning_content`
and `delta.content` as tokens are generated (see `streaming.py` for where the answer starts).
The strategy comes from the model name (`smollm2-135m:self-consistency-8`, `...:sc-16`) or the
extra body field `{"thinktime": {"strategy": "beam", "width": 8, "budget_tokens": 20000}}`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinktime.api import Thinker
from thinktime.errors import EngineError, InsufficientMemoryError, ThinktimeError
from thinktime.server.protocol import APIError, error_type, parse_request
from thinktime.server.scheduler import Job, QueueFull
from thinktime.server.service import (ChatService, ServerConfig, cot_extension, finish_reason, result_extension,
                                      logprobs_field, parse_model)
from thinktime.server.streaming import CandidateView, ReasoningStream, reply_split
from thinktime.strategies import STRATEGIES
from thinktime.types import Event, StreamDelta


def create_app(thinker: Thinker, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    service = ChatService(thinker, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.scheduler.close)

    app = FastAPI(title="thinktime", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    v1 = [Depends(_key_check(config))]
    _add_model_routes(app, service, v1)
    _add_chat_route(app, service, config, v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type=error_type(exc.status_code),
                         code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)


def _key_check(config: ServerConfig):
    async def check_key(request: Request) -> None:
        """With a key set, /v1 needs 'Authorization: Bearer <key>' (a dependency, not a middleware:
        Starlette's BaseHTTPMiddleware would hide client disconnects from the handlers)."""
        if not config.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check_key


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "thinktime"}


def _add_model_routes(app: FastAPI, service: ChatService, v1: list) -> None:
    """/health, and the models with their strategy suffixes."""

    @app.get("/health")
    async def health():
        s = service.scheduler
        return {"status": "ok", "model": service.names[0], "queued": s.queued, "running": len(s.running),
                "max_queue": s.max_queue, **s.stats}

    @app.get("/v1/models", dependencies=v1)
    async def list_models():
        data = []
        for name in service.names:
            data.append(_model_card(name))
            data.extend(_model_card(f"{name}:{s}") for s in STRATEGIES if s != "cot")
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str):
        parse_model(model_id, service.names)
        return _model_card(model_id)


def _add_chat_route(app: FastAPI, service: ChatService, config: ServerConfig, v1: list) -> None:
    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request):
        req = _request(_payload(await _read_body(request, config.max_body_bytes)))
        # Rendering and counting a long prompt takes a while: off the event loop, so other streams keep flowing.
        base, strategy, ctx, prompt_tokens = await asyncio.to_thread(service.prepare, req)
        loop = asyncio.get_running_loop()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = time.monotonic() + config.request_timeout
        if req.stream:
            events: asyncio.Queue = asyncio.Queue()
            job = service.make_job(loop, strategy, ctx, req.n, stream_to=events)
            _submit(service, job)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(service, job, events, rid, req.model, strategy, req.n, include_usage, deadline),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        job = service.make_job(loop, strategy, ctx, req.n)
        _submit(service, job)
        if not await _wait_for(service, job, request, deadline):
            return Response(status_code=499)
        result = _outcome(job)
        content = service.completion_body(rid, req.model, strategy, result, prompt_tokens)
        return JSONResponse(content)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) once it is over max_bytes."""
    too_large = APIError(413, f"the request body is over {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large  # refused before a byte of it is read
    parts, size = [], 0
    async for part in request.stream():  # counted as it comes: a chunked body has no length to check
        size += len(part)
        if size > max_bytes:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def _payload(body: bytes):
    """The body's JSON, refused when it is not JSON, holds lone surrogates or nests too deeply."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    try:  # JSON may escape lone surrogates ("\ud800"), which no tokenizer can encode
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds text that is not valid Unicode (a lone surrogate)",
                       code="invalid_value") from None
    except (ValueError, RecursionError):  # NaN is fine here; only the nesting depth can fail
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    return payload


def _request(payload):
    """The request's fields checked (a body nested too deeply to check is refused)."""
    try:
        return parse_request(payload)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None


async def _wait_for(service: ChatService, job: Job, request: Request, deadline: float) -> bool:
    """Waits for the job's end; False when the client went away, 504 past the deadline (both withdraw it)."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return True
            if await request.is_disconnected():
                service.scheduler.withdraw(job)
                return False
            if time.monotonic() > deadline:
                service.scheduler.withdraw(job)
                raise APIError(504, f"the request took longer than {service.config.request_timeout:g} s",
                               type="timeout_error", code="timeout")
    except asyncio.CancelledError:  # the server is cancelling this handler (client gone, shutdown)
        service.scheduler.withdraw(job)
        raise


def _submit(service: ChatService, job: Job) -> None:
    try:
        service.scheduler.submit(job)
    except QueueFull as exc:
        raise APIError(429, f"The server is busy ({service.scheduler.max_queue} requests waiting); "
                            f"retry after {exc.retry_after} s", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None


def _engine_failure(error: ThinktimeError) -> APIError:
    """A failure of a request that passed its checks: the request's fault (400), or the server's, when
    memory ran out (503: a smaller request, or the same later, may pass) or its engine failed (502)."""
    message = f"{error.message} ({error.hint})" if error.hint else error.message
    if isinstance(error, InsufficientMemoryError):
        return APIError(503, message, type="server_error", code="out_of_memory")
    if isinstance(error, EngineError):
        return APIError(502, message, type="server_error", code="engine_error")
    return APIError(400, message, code="invalid_value")


def _outcome(job: Job):
    error = job.future.exception()
    if error is None:
        return job.future.result()
    if isinstance(error, ThinktimeError):
        raise _engine_failure(error)
    if isinstance(error, asyncio.CancelledError):
        raise APIError(504, "the request was cancelled before it finished", type="timeout_error", code="cancelled")
    raise APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


class _Tally:
    """What a stream has sent so far: usage, each choice's answer text (for reasoning_tokens), finished choices."""

    def __init__(self):
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.contents: dict[int, str] = {}
        self.finished: set[int] = set()

    def add_content(self, index: int, content: str) -> None:
        self.contents[index] = self.contents.get(index, "") + content


async def _stream(service: ChatService, job: Job, events: asyncio.Queue, rid: str, model: str, strategy: str,
                  n: int, include_usage: bool, deadline: float):
    created = int(time.time())
    chunk = lambda choices, **kw: _chunk(rid, created, model, choices, None, include_usage, **kw)  # noqa: E731
    splitters = [ReasoningStream(service.think_tags) for _ in range(n)]
    view = CandidateView()
    tally = _Tally()
    try:
        yield chunk([_delta(i, role="assistant", content="") for i in range(n)])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:  # checked before every event: a stream that keeps producing ends on time too
                service.scheduler.withdraw(job)
                error = APIError(504, f"the request took longer than {service.config.request_timeout:g} s",
                                 type="timeout_error", code="timeout")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            try:
                item = await asyncio.wait_for(events.get(), timeout=min(1.0, left))
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    continue  # the check above ends it
                if job.future.done() and events.empty():
                    item = None  # the job ended without streaming (withdrawn, failed to start)
                else:
                    yield ": waiting\n\n"  # keeps proxies patient and notices a closed connection
                    continue
            if item is None:
                if job.future.done() or await _settled(job):
                    failure = _failure_line(job)
                    if failure:
                        yield failure
                break
            if isinstance(item, StreamDelta):  # cot: choice `index` of n
                for line in _chain_chunks(item, splitters[item.index], tally, chunk):
                    yield line
            elif isinstance(item, Event):  # another strategy: its chains as reasoning, then its answer
                for line in _strategy_chunks(item, view, tally, chunk, service.think_tags):
                    yield line
        if include_usage and tally.finished:
            yield await _usage_chunk(service, tally, rid, created, model)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop the work
        if not job.future.done():
            service.scheduler.withdraw(job)


def _failure_line(job: Job) -> str | None:
    """The error event of a job that failed (None when it finished or was cancelled)."""
    error = job.future.exception()
    if error is None or isinstance(error, asyncio.CancelledError):
        return None
    body = (_engine_failure(error) if isinstance(error, ThinktimeError) else
            APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")).body()
    return f"data: {json.dumps(body)}\n\n"


def _chain_chunks(item: StreamDelta, splitter: ReasoningStream, tally: _Tally, chunk):
    """The chunks of one cot chain's delta: its reasoning and answer text, and its end."""
    if item.text:
        yield from _text_chunks(item.index, *splitter.feed(item.text), tally, chunk)
    if item.completion is not None:
        c = item.completion
        yield from _text_chunks(item.index, *splitter.finish(c.finish_reason), tally, chunk)
        tally.usage["prompt_tokens"] = c.prompt_tokens
        tally.usage["completion_tokens"] += c.completion_tokens
        tally.finished.add(item.index)
        yield chunk([{**_delta(item.index, finish_reason(c.finish_reason)), "logprobs": logprobs_field(c)}],
                    thinktime=cot_extension([c]))


def _text_chunks(index: int, reasoning: str, content: str, tally: _Tally, chunk):
    """A chain's reasoning, then its answer text (counted into the tally), as chunks."""
    if reasoning:
        yield chunk([_delta(index, reasoning_content=reasoning)])
    if content:
        tally.add_content(index, content)
        yield chunk([_delta(index, content=content)])


def _strategy_chunks(item: Event, view: CandidateView, tally: _Tally, chunk, think_tags):
    """The chunks of a multi-chain strategy's event: its chains as reasoning, then its answer."""
    text = ""
    if item.kind == "delta":
        text = view.delta(item.index, item.text)
    elif item.kind == "candidate_finished":
        text = view.finish(item.index, item.data)
    elif item.kind == "progress":
        text = view.progress(item.data)
    elif item.kind == "result":
        result = item.result
        text = view.flush(result)
        if text:
            yield chunk([_delta(0, reasoning_content=text)])
        _, content = reply_split(result.text, result.finish_reason, think_tags)
        tally.contents = {0: content}
        if content:
            yield chunk([_delta(0, content=content)])
        tally.usage = {"prompt_tokens": result.usage.prompt_tokens,
                       "completion_tokens": result.usage.completion_tokens}
        tally.finished.add(0)
        yield chunk([_delta(0, finish_reason(result.finish_reason))], thinktime=result_extension(result))
        return
    if text:
        yield chunk([_delta(0, reasoning_content=text)])


async def _usage_chunk(service: ChatService, tally: _Tally, rid: str, created: int, model: str) -> str:
    """The closing chunk with the stream's usage (include_usage), reasoning tokens counted off the event loop."""
    usage = tally.usage
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    usage["completion_tokens_details"] = {"reasoning_tokens": await asyncio.to_thread(
        service.reasoning_tokens, usage, list(tally.contents.values()))}
    return _chunk(rid, created, model, [], usage, True)


async def _settled(job: Job) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(job.future), timeout=5)
    except BaseException:
        pass
    return job.future.done()


def _chunk(rid: str, created: int, model: str, choices: list[dict], usage: Any = None, include_usage=False,
           **extra) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, **extra}
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _delta(index: int, finish: str | None = None, **fields) -> dict:
    if "reasoning_content" in fields:  # the newer field name too, as clients read either
        fields["reasoning"] = fields["reasoning_content"]
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish}
