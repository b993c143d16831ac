"""The OpenAI-compatible server, live on the loopback, driven by the official `openai` client.

Real HTTP, the real embedded model, tiny token counts (the machines are 2 shared CPU cores).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from thinktime import Thinker
from thinktime.server.app import ServerConfig, create_app
from thinktime.server.background import BackgroundServer
from thinktime.server.protocol import parse_request
from thinktime.types import Prompt

MODEL = "smollm2-135m"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server_thinker(engine):
    return Thinker(engine=engine, max_new_tokens=24)


@pytest.fixture(scope="module")
def server(server_thinker):
    app = create_app(server_thinker, ServerConfig(max_n=4))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def service(server):
    return server.app.state.service


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def prompt_tokens(thinker, question: str) -> int:
    engine = thinker.engine
    return engine.count_tokens(engine.render(Prompt.of(thinker.messages(question))))


def test_models_health_and_loopback(server):
    assert server.host == "127.0.0.1"
    assert health(server)["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert MODEL in ids and models["object"] == "list"
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_non_streaming_reasoning_apart_and_exact_usage(client, server_thinker):
    # a question whose first token is no bf16 near-tie: the answer starts with reasoning however it is batched
    question = "How many legs do 3 cats have?"
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              max_tokens=16)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    reasoning = choice.message.reasoning_content
    assert isinstance(reasoning, str) and reasoning  # the chain of thought, apart from the answer
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_tokens(server_thinker, question)
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_sends_reasoning_token_by_token(client, server_thinker):
    question = "What is 7 times 6?"
    messages = [{"role": "user", "content": question}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, arrivals, finish, usage, ids = [], [], [], None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            piece = getattr(delta, "reasoning_content", None)
            if piece:
                reasoning.append(piece)
                arrivals.append(time.monotonic())
            if delta.content:
                content.append(delta.content)
            finish = choice.finish_reason or finish
    assert len(ids) == 1
    assert len(reasoning) >= 5, reasoning  # many separate deltas, not one buffered chunk
    assert arrivals[-1] - arrivals[0] > 0.05  # they arrived over time, as generated
    assert finish in ("stop", "length")
    # the same greedy request without streaming: same text, same usage
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    assert "".join(reasoning).strip().startswith(whole.choices[0].message.reasoning_content.strip())
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.prompt_tokens == prompt_tokens(server_thinker, question)


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"


def test_n_choices_non_streaming_and_streaming(client):
    messages = [{"role": "user", "content": "Name a prime number."}]
    response = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=8,
                                              temperature=0.9, seed=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.reasoning_content or c.message.content for c in response.choices)
    assert 3 <= response.usage.completion_tokens <= 3 * 8
    seen, finished = {0: "", 1: ""}, set()
    usage = None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=8, temperature=0.9,
                                                seed=3, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            seen[choice.index] += (getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(seen.values())
    assert 2 <= usage.completion_tokens <= 16


def test_strategy_by_model_suffix_and_extra_body(client):
    response = client.chat.completions.create(model=f"{MODEL}:cot", messages=[{"role": "user", "content": "1+1?"}],
                                              max_tokens=4, extra_body={"thinktime": {"strategy": "cot"}})
    assert response.model == f"{MODEL}:cot"
    assert response.model_extra["thinktime"]["strategy"] == "cot"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{MODEL}:no-such-strategy", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"thinktime": {"strategy": "no-such-strategy"}})
    assert info.value.body["param"] == "thinktime.strategy"


def test_multi_chain_strategy_streams_candidates(client):
    from thinktime.strategies import STRATEGIES

    name = next((s for s in ("self-consistency", "best-of-n") if s in STRATEGIES), None)
    if name is None:
        pytest.skip("no multi-chain strategy registered yet")
    response = client.chat.completions.create(model=f"{MODEL}:{name}-2", messages=[{"role": "user", "content": "2+2?"}],
                                              max_tokens=8, temperature=0.8, seed=1)
    extension = response.model_extra["thinktime"]
    assert extension["strategy"] == name and len(extension["candidates"]) == 2
    chunks = list(client.chat.completions.create(model=f"{MODEL}:{name}-2", stream=True, max_tokens=8,
                                                 messages=[{"role": "user", "content": "2+2?"}], temperature=0.8))
    text = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert "candidate 1" in text and "candidate 2" in text


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="no-such-model"), 404, "model"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=10**9), 400, "max_tokens"),
    (dict(max_completion_tokens=-1), 400, "max_completion_tokens"),
    (dict(n=0), 400, "n"),
    (dict(n=99), 400, "n"),
    (dict(temperature=5), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "word " * 9000}]), 400, "messages"),
    # a strategy's chains side by side are capped by --max-n (4 here) as n is: by suffix, by option
    (dict(model=f"{MODEL}:sc-99"), 400, "model"),
    (dict(extra_body={"thinktime": {"strategy": "self-consistency", "n": 99}}), 400, "thinktime.n"),
    (dict(extra_body={"thinktime": {"strategy": "beam", "width": 99}}), 400, "thinktime.width"),
    (dict(model=f"{MODEL}:cot-5"), 404, "model"),  # cot has no size: the request's n is its chains
    (dict(extra_body={"thinktime": {"n": 2}}), 400, "thinktime.n"),
    (dict(extra_body={"thinktime": {"bogus": 1}}), 400, "thinktime"),  # cot's options are checked too: none
    (dict(logprobs=True, model=f"{MODEL}:sc-2"), 400, "logprobs"),  # a strategy's answer has no token logprobs
    (dict(logprobs=True, extra_body={"top_logprobs": 21}), 400, "top_logprobs"),
    (dict(extra_body={"top_logprobs": 2}), 400, "top_logprobs"),  # without logprobs
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),  # without stream, as OpenAI
    (dict(n=2, extra_body={"thinktime": {"budget_tokens": 1}}), 400, "thinktime.budget_tokens"),
    (dict(n=2, stream=True, extra_body={"thinktime": {"budget_tokens": 1}}), 400, "thinktime.budget_tokens"),
    # caps hold however a value is written, and token options are capped as max_tokens is
    (dict(extra_body={"thinktime": {"strategy": "beam", "width": "99"}}), 400, "thinktime.width"),
    (dict(extra_body={"thinktime": {"strategy": "beam", "width": 99.0}}), 400, "thinktime.width"),
    (dict(extra_body={"thinktime": {"strategy": "beam", "step_tokens": 10**6}}), 400, "thinktime.step_tokens"),
    (dict(model=f"{MODEL}:budget-9999"), 400, "model"),
    (dict(model=f"{MODEL}:sc-0"), 400, "model"),  # a known strategy with a bad size: said so, not "unknown"
    (dict(model=f"{MODEL}:sc-123456"), 400, "model"),
    (dict(frequency_penalty=1.5), 400, "frequency_penalty"),
    (dict(extra_body={"top_k": 5}), 400, "top_k"),
    (dict(extra_body={"reasoning_effort": "extreme"}), 400, "reasoning_effort"),
])
def test_bad_requests_get_openai_errors(client, kwargs, status, param):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    error = info.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param or (error["param"] or "").startswith(param)
    if "word " in str(kwargs):
        assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw, status", [
    (b"{not json", 400), (b"", 400), (b"[1, 2]", 400), (b'"text"', 400),
    (json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": "2"}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400),
    (json.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400),
    (b"[" * 100000, 400),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', 400),
])
def test_malformed_bodies(server, raw, status):
    response = httpx.post(server.url + "/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert health(server)["status"] == "ok"  # still serving


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = httpx.get(server.url + "/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_api_key_required_when_set(server_thinker):
    app = create_app(server_thinker, ServerConfig(api_key=KEY))
    with BackgroundServer(app) as keyed:
        anonymous = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        response = httpx.post(keyed.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        allowed = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
        assert allowed.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2).choices
        assert httpx.get(keyed.url + "/health").status_code == 200  # liveness stays open


@pytest.fixture(scope="module")
def plain(engine):
    """A second server without the thinking system prompt: short prompts for the many-clients test."""
    thinker = Thinker(engine=engine, max_new_tokens=6, think=False)
    with BackgroundServer(create_app(thinker)) as running:
        yield running, thinker, openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0,
                                              timeout=300)


def test_sixteen_parallel_clients_all_answered_none_crossed(plain):
    """8 greedy clients and 8 seeded sampling clients at once: their rows decode in one continuous batch."""
    server, server_thinker, client = plain
    questions = [f"Marker {i}: {'add ' * i}what is {i} plus {i}?" for i in range(16)]
    before = health(server)

    def ask(i: int):
        sampled = i % 2 == 1
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": questions[i]}], max_tokens=6,
            temperature=0.8 if sampled else 0, seed=1000 + i if sampled else None)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(16)))
    assert len({r.id for r in responses}) == 16
    for i, response in enumerate(responses):  # each answer belongs to its own question
        assert response.usage.prompt_tokens == prompt_tokens(server_thinker, questions[i])
        assert response.choices[0].message.reasoning_content or response.choices[0].message.content
    after = health(server)
    assert after["served"] - before["served"] == 16 and after["failed"] == before["failed"]
    assert server_thinker.engine.batcher.stats["most_calls"] > 2  # several clients' rows shared decoding steps
    # (a seeded request asked again alone gives the same text in fp32: tests/test_engine_hf_batching.py; this
    # engine is bf16, where another batch can flip a near-tie)


def _wait_idle(server, cancelled_before: int, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = health(server)
        if state["running"] == 0 and state["queued"] == 0 and state["cancelled"] > cancelled_before:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the work was not cancelled: {health(server)}")


def test_size_suffix_sets_each_strategys_own_size_option(server):
    """`:beam-2` is beam with width 2 (the option `eval -n` scales), not an unknown option 'n'."""
    assert httpx.get(server.url + f"/v1/models/{MODEL}:beam-2").status_code == 200
    _, strategy, ctx, _ = service(server).prepare(
        parse_request({"model": f"{MODEL}:beam-2", "messages": [{"role": "user", "content": "1+1?"}]}))
    assert strategy == "beam" and ctx.options["width"] == 2 and "n" not in ctx.options


def test_null_means_the_default_as_in_openais_api(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 2, "n": None,
            "stream": None, "temperature": None, "stop": None}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_seeded_greedy_requests_run_alone():
    """Batched rows sum in another order (padding, a shared prefix): with a seed, a request runs alone, so the
    same request gives the same text whatever else the server is doing."""
    import asyncio

    from thinktime.server.scheduler import Job
    from thinktime.types import SamplingParams

    loop = asyncio.new_event_loop()
    try:
        job = lambda **p: Job(loop, loop.create_future(), prompt=Prompt.of([{"role": "user", "content": "x"}]), params=SamplingParams(**p))  # noqa: E731
        assert job(temperature=0.0).batch_key is not None  # greedy, unseeded: batched with its like
        assert job(temperature=0.0, seed=3).batch_key is None
        assert job(temperature=0.8, seed=3).batch_key is None
    finally:
        loop.close()


def test_finished_stream_counts_as_served_not_cancelled(server):
    before = health(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert "data: [DONE]" in list(response.iter_lines())  # finished normally
    deadline = time.monotonic() + 10
    while health(server)["served"] == before["served"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = health(server)
    assert after["served"] == before["served"] + 1 and after["cancelled"] == before["cancelled"]


def test_request_timeout_ends_a_stream_that_keeps_producing(server):
    config = service(server).config
    old_timeout = config.request_timeout
    config.request_timeout = 3.0
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000,
                "temperature": 0.8, "seed": 5, "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
    finally:
        config.request_timeout = old_timeout
    assert any("reasoning_content" in line for line in lines)  # it was producing when time ran out
    errors = [json.loads(line[len("data: "):]) for line in lines if '"error"' in line]
    assert len(errors) == 1 and '"error"' in lines[-2]  # the error closes the stream (then [DONE], as vLLM's)
    error = errors[0]
    assert error["error"]["code"] == "timeout" and error["error"]["type"] == "timeout_error"
    assert elapsed < 15  # 4000 tokens would take minutes
    _wait_idle(server, -1)


def test_streaming_disconnect_cancels_generation(server):
    before = health(server)["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        got = 0
        for line in response.iter_lines():
            if "reasoning_content" in line:
                got += 1
                if got == 3:
                    break  # leave after three tokens
    started = time.monotonic()
    _wait_idle(server, before)
    assert time.monotonic() - started < 20  # 4000 tokens would take minutes


def test_non_streaming_disconnect_cancels_generation(server):
    before = health(server)["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=2.0)
    _wait_idle(server, before)


def test_full_queue_answers_429_with_retry_after_then_timeout(server_thinker):
    # one request runs at a time and one may wait: the third is refused
    config = ServerConfig(max_batch=1, max_queue=1, request_timeout=3.0)
    with BackgroundServer(create_app(server_thinker, config)) as server:
        long = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 4000}
        results: dict[str, httpx.Response] = {}

        def post(name):
            results[name] = httpx.post(server.url + "/v1/chat/completions", json=long, timeout=60)

        first = threading.Thread(target=post, args=("running",))
        first.start()
        deadline = time.monotonic() + 10
        while health(server)["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = threading.Thread(target=post, args=("queued",))
        second.start()
        while health(server)["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = httpx.post(server.url + "/v1/chat/completions", json=long, timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        first.join(60)
        second.join(60)
        # both ran out of the 3 s per-request timeout: an OpenAI-style timeout error, work stopped
        for name in ("running", "queued"):
            assert results[name].status_code == 504, results[name].text
            assert results[name].json()["error"]["code"] in ("timeout", "cancelled")
        assert health(server)["status"] == "ok"


def test_thinktime_serve_command_end_to_end():
    """`thinktime serve` as users run it: a subprocess on the loopback, with a key."""
    import os
    import subprocess
    import sys

    from thinktime.server.background import free_port

    port = free_port()
    env = dict(os.environ, THINKTIME_API_KEY=KEY)
    process = subprocess.Popen([sys.executable, "-m", "thinktime.cli", "serve", "--model", MODEL, "--port", str(port),
                                "--max-new-tokens", "4", "--no-think"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "thinktime serve did not come up"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens <= 4 and reply.choices[0].message is not None
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/v1" in output  # bound to the loopback by default


def test_out_of_memory_is_a_503_and_the_server_serves_on(server, server_thinker, monkeypatch):
    # The allocator's failure is simulated inside the real engine (filling a GPU is not an option in
    # CI); the server must say it was the server's memory, not a bad request, and keep serving.
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    body = {"model": MODEL, "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 4, "n": 2}
    with monkeypatch.context() as patch:
        patch.setattr(server_thinker.engine, "_decode", out_of_memory)
        answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "out_of_memory" and "fewer samples" in error["message"]
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert any(json.loads(e[6:]).get("error", {}).get("code") == "out_of_memory" for e in events if e != "data: [DONE]")
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_defaults_of_unsupported_parameters_and_huge_seeds_are_accepted(client):
    # clients send the "off" values of parameters this server lacks; a seed anywhere in uint64 works for every
    # strategy (multi-call strategies derive seeds from it)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "1+1?"}], max_tokens=4,
                                           frequency_penalty=0, presence_penalty=0.0,
                                           extra_body={"top_k": -1, "repetition_penalty": 1.0, "best_of": 1})
    assert reply.choices[0].finish_reason in ("stop", "length")
    for model in (MODEL, f"{MODEL}:sc-2"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "1+1?"}],
                                               max_tokens=4, seed=2**64 - 1, temperature=0.7,
                                               extra_body={"thinktime": {"round": 1}} if ":" in model else None)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_budget_forcing_with_no_minimum_is_accepted(client):
    reply = client.chat.completions.create(model=f"{MODEL}:budget", messages=[{"role": "user", "content": "1+1?"}],
                                           max_tokens=8, extra_body={"thinktime": {"min_tokens": 0}})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_cot_replies_carry_the_checked_answer(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert reply["thinktime"]["strategy"] == "cot" and "answer" in reply["thinktime"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals and "answer" in finals[-1]["thinktime"]


def test_served_names_with_colons_take_strategy_suffixes(server_thinker):
    app = create_app(server_thinker, ServerConfig(served_names=("smol:135m",), max_n=4))
    with BackgroundServer(app) as named:
        assert httpx.get(named.url + "/v1/models/smol:135m:self-consistency").status_code == 200
        body = {"model": "smol:135m:sc-2", "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 4}
        reply = httpx.post(named.url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["thinktime"]["strategy"] == "self-consistency"


def test_an_oversized_body_is_refused_before_it_is_read(server_thinker):
    app = create_app(server_thinker, ServerConfig(max_body_bytes=1000))
    with BackgroundServer(app) as small:
        declared = httpx.post(small.url + "/v1/chat/completions", content=b"x" * 5000,
                              headers={"content-type": "application/json"}, timeout=30)
        assert declared.status_code == 413

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(50):
                yield b"x" * 100

        streamed = httpx.post(small.url + "/v1/chat/completions", content=chunks(),
                              headers={"content-type": "application/json"}, timeout=30)
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"


def test_reasoning_effort_maps_to_budgets_and_usage_counts_reasoning_tokens(client, server_thinker, server):
    """reasoning_effort: none drops the thinking prompt, low/high scale the default new tokens; usage says which
    tokens were thinking; the reasoning is also under `reasoning`, as newer clients read it."""
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}])
    plain = client.chat.completions.create(**ask, extra_body={"reasoning_effort": "none"})
    thinking = client.chat.completions.create(**ask, extra_body={"reasoning_effort": "medium"})
    plain_prompt = server_thinker.engine.count_tokens(server_thinker.engine.render(
        Prompt.of([{"role": "user", "content": "What is 2 + 3?"}])))
    assert plain.usage.prompt_tokens == plain_prompt < thinking.usage.prompt_tokens
    low = client.chat.completions.create(**ask, extra_body={"reasoning_effort": "low"})
    default = service(server).default_max_tokens
    assert low.usage.completion_tokens <= max(1, round(default * 0.25))
    for reply in (plain, thinking, low):
        message = reply.choices[0].message
        details = reply.usage.completion_tokens_details
        assert 0 <= details.reasoning_tokens <= reply.usage.completion_tokens
        assert message.model_extra["reasoning"] == message.reasoning_content
        if message.reasoning_content and not message.content:
            assert details.reasoning_tokens == reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"reasoning_effort": "low"}))
    streamed = [c.choices[0].delta for c in chunks if c.choices]
    thought = [d for d in streamed if getattr(d, "reasoning_content", None)]
    assert thought and all(d.reasoning == d.reasoning_content for d in thought)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens <= chunks[-1].usage.completion_tokens


def test_logprobs_for_cot_choices_from_the_transformers_engine(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=5, logprobs=True, top_logprobs=2)
    [choice] = reply.choices
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:  # greedy: the chosen token is the most likely one
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
