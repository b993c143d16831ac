"""The OpenAI engine against servers that misbehave as real ones do, over real HTTP on the loopback.

The engine is what is under test; the server around it is a small FastAPI app that answers each path
(`/<mode>/v1/...`) the way some server in the wild does: a body that is not a stream, an error object in a
200, a stream that stops before [DONE], a sample ended with `finish_reason: "error"`, llama.cpp's refusal
of `n`, a server that goes silent. Each must end in a clear EngineError, a retry or a fallback, and a
cancel must return at once: never an empty or cut answer passed off as finished.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from thinktime.engines.openai import OpenAIEngine
from thinktime.errors import BadInputError, EngineError
from thinktime.server.background import BackgroundServer
from thinktime.types import Prompt, SamplingParams

PROMPT = Prompt.of([{"role": "user", "content": "What is 2 + 2?"}])
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def _sse(*events) -> list[str]:
    return [f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n" for e in events]


def _delta(text: str, finish: str | None = None, index: int = 0) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": {"content": text},
                                                            "finish_reason": finish}]}


async def _unsure_tokens(app, body):
    """40 tokens, each in its own chunk, then [DONE]: token `step`'s alternatives j have log-probability
    0.1 * step - 4 - j, so its confidence (their negative mean) falls: 4.5 - 0.1 * step with two. How many
    were sent before the client hung up is recorded."""
    sent = 0
    try:
        for step in range(40):
            top = [{"token": f"t{j}", "logprob": 0.1 * step - 4 - j, "bytes": []} for j in range(body["top_logprobs"])]
            item = {"index": 0, "delta": {"content": f"w{step} "}, "finish_reason": None,
                    "logprobs": {"content": [{"token": f"w{step} ", "logprob": top[0]["logprob"], "bytes": [],
                                              "top_logprobs": top}]}}
            yield _sse({"object": "chat.completion.chunk", "choices": [item]})[0]
            sent += 1
            await asyncio.sleep(0.02)
        yield _sse(_delta("", "stop"), "[DONE]")[0]
    finally:
        app.state.sent.append(sent)


def _fake_app() -> FastAPI:
    app = FastAPI()
    app.state.attempts = {}
    app.state.cut = {}
    app.state.requests = []
    app.state.sent = []

    @app.get("/{mode}/v1/models")
    async def models(mode: str):
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str, request: Request):
        body = await request.json()
        attempt = app.state.attempts[mode] = app.state.attempts.get(mode, 0) + 1
        n = body.get("n", 1)
        good = [": keep-alive\n\n", *_sse(*(_delta("The answer is ", index=i) for i in range(n)),
                                          *(_delta("\\boxed{4}.", "stop", index=i) for i in range(n)),
                                          {"choices": [], "usage": USAGE}, "[DONE]")]
        if mode == "json":  # ignores stream: true
            return JSONResponse({"object": "chat.completion", "usage": USAGE, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "It is \\boxed{4}."}, "finish_reason": "stop"}]})
        if mode == "html":  # a proxy's login page
            return PlainTextResponse("<html><body>Please sign in</body></html>", media_type="text/html")
        if mode == "done-only":
            return StreamingResponse(iter(_sse("[DONE]")), media_type="text/event-stream")
        if mode == "error-object":  # FastChat / LMDeploy put errors in a 200
            return StreamingResponse(iter(_sse({"object": "error", "message": "context length exceeded"})),
                                     media_type="text/event-stream")
        if mode == "cut-once":  # the first stream stops before its end; the retry is whole
            events = _sse(_delta("The ans")) if attempt == 1 else good
            return StreamingResponse(iter(events), media_type="text/event-stream")
        if mode == "cut-always":
            return StreamingResponse(iter(_sse(_delta("The ans"))), media_type="text/event-stream")
        if mode == "finish-error":
            return StreamingResponse(iter(_sse(_delta("The ans", "error"), "[DONE]")), media_type="text/event-stream")
        if mode == "llama-n" and n > 1:
            return JSONResponse({"error": {"message": "Only one completion choice is allowed", "code": 500}},
                                status_code=500)
        if mode == "one-fails":  # no n; of the single requests, one fails (seed 1, or "fail") and the others stall
            if n > 1:
                return JSONResponse({"error": {"message": "Only one completion choice is allowed"}}, status_code=500)
            if body.get("seed") == 1 or body["messages"][-1]["content"] == "fail":
                return StreamingResponse(iter(_sse({"object": "error", "message": "out of memory"})),
                                         media_type="text/event-stream")
        if mode == "logprobs" and body.get("logprobs"):  # per-token log-probabilities, growing less sure
            app.state.requests.append(body)
            return StreamingResponse(_unsure_tokens(app, body), media_type="text/event-stream")
        if mode in ("silent", "one-fails"):  # headers come, then nothing for a long time
            async def stall():
                yield _sse(_delta("The "))[0]
                try:
                    await asyncio.sleep(8)
                except asyncio.CancelledError:  # the client hung up
                    app.state.cut[mode] = app.state.cut.get(mode, 0) + 1
                    raise
                for event in good:
                    yield event
            return StreamingResponse(stall(), media_type="text/event-stream")
        return StreamingResponse(iter(good), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake():
    app = _fake_app()
    with BackgroundServer(app) as running:
        yield running


def engine_for(fake, mode: str, **options) -> OpenAIEngine:
    return OpenAIEngine("fake", base_url=f"{fake.url}/{mode}/v1", max_retries=2, **options)


def generate(fake, mode: str, n: int = 1, **options):
    engine = engine_for(fake, mode, **options)
    try:
        return engine.generate([PROMPT], SamplingParams(max_new_tokens=16, n=n, temperature=0.7 if n > 1 else 0.0,
                                                        seed=1))[0]
    finally:
        engine.close()


def test_a_well_behaved_stream_with_keepalives(fake):
    [completion] = generate(fake, "ok")
    assert completion.text == "The answer is \\boxed{4}." and completion.finish_reason == "stop"
    assert completion.completion_tokens == 3 and completion.prompt_tokens == 9


def test_a_json_body_instead_of_a_stream_is_read(fake):
    [completion] = generate(fake, "json")
    assert completion.text == "It is \\boxed{4}." and completion.finish_reason == "stop"


@pytest.mark.parametrize("mode, message", [
    ("html", "Please sign in"),
    ("done-only", "[DONE] only"),
    ("error-object", "context length exceeded"),
    ("finish-error", "finish_reason 'error'"),
    ("cut-always", "ended before [DONE]"),
])
def test_a_200_without_a_completion_is_an_error_not_an_empty_answer(fake, mode, message):
    with pytest.raises(EngineError) as info:
        generate(fake, mode)
    assert message in str(info.value)
    assert info.value.exit_code == 6


def test_a_stream_cut_before_its_end_is_retried(fake):
    [completion] = generate(fake, "cut-once")
    assert completion.text == "The answer is \\boxed{4}." and fake.app.state.attempts["cut-once"] == 2


def test_llama_cpps_refusal_of_n_falls_back_to_single_requests(fake):
    completions = generate(fake, "llama-n", n=3)
    assert [c.text for c in completions] == ["The answer is \\boxed{4}."] * 3
    assert all(c.finish_reason == "stop" for c in completions)


def test_a_cancel_returns_at_once_while_the_server_is_silent(fake):
    engine = engine_for(fake, "silent")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    try:
        [[completion]] = engine.generate([PROMPT], SamplingParams(max_new_tokens=16), cancel)
    finally:
        engine.close()
    assert time.monotonic() - started < 3  # the server would send the rest after 8 s
    assert completion.finish_reason == "cancelled" and completion.text == "The "  # the text made so far is kept


@pytest.mark.parametrize("prompts, n", [([PROMPT], 3), ([PROMPT, Prompt.of([{"role": "user", "content": "fail"}]),
                                                        PROMPT], 1)])
def test_one_failed_request_stops_its_siblings_at_once(fake, prompts, n):
    # n samples as single requests, or several prompts: the first failure ends the call, and the
    # requests still running are cut rather than left to hold the server for minutes.
    engine = engine_for(fake, "one-fails")
    started = time.monotonic()
    try:
        with pytest.raises(EngineError, match="out of memory"):
            engine.generate(prompts, SamplingParams(max_new_tokens=16, n=n, temperature=0.7, seed=1 if n > 1 else None))
    finally:
        engine.close()
    assert time.monotonic() - started < 3  # the silent siblings would answer after 8 s
    while fake.app.state.cut.get("one-fails", 0) < 2 and time.monotonic() - started < 3:
        time.sleep(0.05)
    assert fake.app.state.cut.get("one-fails", 0) == 2  # both silent siblings were hung up on
    fake.app.state.cut.clear()


def test_a_server_without_logprobs_is_refused_before_generating(fake):
    engine = engine_for(fake, "ok")
    try:
        assert not engine.returns_logprobs  # asked once, with a one-token request
        for params in (SamplingParams(max_new_tokens=16, logprobs=2), SamplingParams(max_new_tokens=16, logprobs=2,
                                                                                     stop_below=(4, 1.0))):
            with pytest.raises(BadInputError, match="openai engine.*does not return log-probabilities"):
                engine.generate([PROMPT], params)
    finally:
        engine.close()


def test_a_sample_below_the_confidence_floor_is_cut_and_the_server_stops(fake):
    engine = engine_for(fake, "logprobs")
    fake.app.state.sent.clear()
    try:
        assert engine.returns_logprobs
        fake.app.state.sent.clear()
        rows = engine.generate([PROMPT], SamplingParams(max_new_tokens=64, n=2, temperature=0.7, seed=3, logprobs=2,
                                                        stop_below=(4, -1.0)))
        whole = [c.finish_reason for c in rows[0]]
        cut = engine.generate([PROMPT], SamplingParams(max_new_tokens=64, logprobs=2, stop_below=(4, 3.0)))[0][0]
    finally:
        engine.close()
    assert whole == ["stop", "stop"]  # above the floor throughout: whole samples, each its own request
    assert [r.get("n", 1) for r in fake.app.state.requests[-3:-1]] == [1, 1]
    # token confidences 4.5, 4.4, ...: the window of 4 ending at step s has mean 4.65 - 0.1 * s, first below 3.0
    # at step 17 (the 18th token)
    assert cut.finish_reason == "low_confidence" and cut.text.startswith("w0 w1 ")
    assert len(cut.logprobs) == cut.completion_tokens == 18 and cut.logprobs[0].top[1][2] == pytest.approx(-5.0)
    deadline = time.monotonic() + 3
    while len(fake.app.state.sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.app.state.sent[-1] < 40  # the server was hung up on: it did not send the rest
