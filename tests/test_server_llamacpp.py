"""The server on the llama.cpp engine: clients' requests decode side by side in one continuous batch, over real
HTTP with the official client (streaming and not, seeded and not), and a failing or departing client leaves its
neighbours alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from thinktime import Thinker
from thinktime.server.app import ServerConfig, create_app
from thinktime.server.background import BackgroundServer
from thinktime.types import Prompt

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def served(llama_engine):
    thinker = Thinker(engine=llama_engine, max_new_tokens=16, think=False)
    with BackgroundServer(create_app(thinker, ServerConfig(max_n=4))) as running:
        yield running, thinker, openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0,
                                              timeout=300)


def prompt_tokens(thinker, question: str) -> int:
    engine = thinker.engine
    return engine.count_tokens(engine.render(Prompt.of(thinker.messages(question))))


def ask(client, question: str, stream: bool, seed: int | None, **extra):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12,
                  temperature=0.8 if seed is not None else 0, seed=seed, **extra)
    if not stream:
        response = client.chat.completions.create(**kwargs)
        message = response.choices[0].message
        return (message.reasoning_content or "") + (message.content or ""), response.usage.prompt_tokens
    text, usage = "", None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            text += (getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")
    return text, usage


def test_many_clients_streaming_and_not_decode_together_none_lost_or_crossed(served):
    server, thinker, client = served
    questions = [f"Marker {i}: {'please ' * (i % 5)}what is {i} plus {i}?" for i in range(16)]
    service = server.app.state.service
    seen_rows = []
    native_decode = thinker.engine.native.decode

    def watch(tokens, positions, seqs, wants):  # records how many rows each step carries, then decodes
        seen_rows.append(len(set(seqs)))
        return native_decode(tokens, positions, seqs, wants)

    thinker.engine.native.decode = watch
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: ask(client, questions[i], stream=i % 2 == 0,
                                                  seed=100 + i if i % 4 < 2 else None), range(16)))
    finally:
        thinker.engine.native.decode = native_decode
    for i, (text, used) in enumerate(answers):
        assert text and used == prompt_tokens(thinker, questions[i])
    assert max(seen_rows) > 2  # several clients' rows shared decoding steps
    assert service.scheduler.stats["failed"] == 0


def test_a_failing_client_does_not_disturb_its_neighbours(served):
    server, thinker, client = served
    results, errors = {}, {}

    def good(i):
        results[i] = ask(client, f"What is {i} times 2?", stream=True, seed=i)

    def bad():
        try:
            ask(client, "word " * 9000, stream=False, seed=None)  # longer than the model's window
        except openai.BadRequestError as exc:
            errors["bad"] = exc

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)] + [threading.Thread(target=bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "bad" in errors and "maximum context length" in str(errors["bad"])
    assert sorted(results) == [0, 1, 2] and all(text for text, _ in results.values())
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_rows(served):
    server, thinker, client = served
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
                                            max_tokens=400, temperature=0.8, seed=5, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    text, used = ask(client, "What is 2 plus 2?", stream=False, seed=None)  # served on
    assert text and used == prompt_tokens(thinker, "What is 2 plus 2?")
    scheduler = thinker.engine.scheduler
    deadline = time.monotonic() + 30
    while scheduler.live and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not scheduler.live  # the departed client's row left the batch


def test_logprobs_over_http_for_cot_choices(served):
    server, thinker, client = served
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=5, logprobs=True, top_logprobs=2, n=2, temperature=0.8, seed=1)
    for choice in reply.choices:
        content = choice.logprobs.content
        assert len(content) >= 1 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    streamed = [c for c in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                          max_tokens=4, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs is not None]
    assert streamed and streamed[-1].choices[0].finish_reason is not None
    with pytest.raises(openai.BadRequestError, match="cot"):
        client.chat.completions.create(model=f"{MODEL}:sc-2", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, logprobs=True)
