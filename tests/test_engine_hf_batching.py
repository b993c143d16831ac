"""Continuous batching on the transformers engine (engines/hf_batching.py), on the real embedded model in fp32:
calls from several threads decode in one batch, joining and leaving it between steps, and each gets exactly what
it gets alone; a cancelled call leaves early without disturbing the others; over real HTTP, the server's clients."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from thinktime import Thinker
from thinktime.errors import BadInputError
from thinktime.server.app import ServerConfig, create_app
from thinktime.server.background import BackgroundServer
from thinktime.types import Prompt, SamplingParams

MODEL = "smollm2-135m"


def prompt(i: int) -> Prompt:
    return Prompt.of([{"role": "user", "content": f"Marker {i}: {'please ' * (i % 4)}what is {i} plus {2 * i}?"}])


CALLS = [  # (prompt, params): greedy and sampled, seeded, several samples, stop strings, different lengths
    (prompt(0), SamplingParams(max_new_tokens=20)),
    (prompt(1), SamplingParams(max_new_tokens=9, temperature=0.8, seed=11)),
    (prompt(2), SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, n=3, seed=12)),
    (prompt(3), SamplingParams(max_new_tokens=24, stop=(".",))),
    (prompt(4), SamplingParams(max_new_tokens=12, temperature=1.0, seed=13, logprobs=2)),
    (prompt(5), SamplingParams(max_new_tokens=6)),
]


def texts(results):
    return [[(c.text, c.finish_reason, c.completion_tokens) for c in row] for row in results]


@pytest.fixture
def batching(fp32_engine):
    assert fp32_engine.start_continuous_batching(max_rows=16)
    yield fp32_engine
    fp32_engine.stop_continuous_batching()


def test_calls_from_many_threads_decode_together_and_get_what_they_get_alone(fp32_engine):
    alone = [texts(fp32_engine.generate([p], params)) for p, params in CALLS]
    alone_logprobs = [c.logprob for c in fp32_engine.generate([CALLS[4][0]], CALLS[4][1])[0][0].logprobs]
    assert fp32_engine.start_continuous_batching(max_rows=16)
    try:
        def call(k):
            time.sleep(0.05 * k)  # staggered: later calls join a batch that is already decoding
            return fp32_engine.generate([CALLS[k][0]], CALLS[k][1])

        with ThreadPoolExecutor(len(CALLS)) as pool:
            together = list(pool.map(call, range(len(CALLS))))
        stats = dict(fp32_engine.batcher.stats)
    finally:
        fp32_engine.stop_continuous_batching()
    assert [texts(r) for r in together] == alone
    assert [c.logprob for c in together[4][0][0].logprobs] == pytest.approx(alone_logprobs, abs=1e-4)
    assert stats["most_calls"] >= 3  # rows of several calls shared decoding steps
    assert fp32_engine.batcher is None and not fp32_engine.continuous_batching


def test_a_stream_joins_the_batch_and_streams_what_it_returns(batching):
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3)
    results = {}
    other = threading.Thread(target=lambda: results.setdefault("other", batching.generate([prompt(7)], params)))
    other.start()
    deltas = list(batching.stream(prompt(8), params))
    other.join()
    streamed = "".join(d.text for d in deltas if d.completion is None)
    final = deltas[-1].completion
    assert streamed + deltas[-1].text == final.text and final.completion_tokens > 0
    assert results["other"][0][0].text


def test_a_cancelled_call_leaves_and_the_others_finish(batching):
    cancel = threading.Event()
    counting = Prompt.of([{"role": "user", "content": "Count from 1 to 500, separated by commas."}])
    stream = batching.stream(counting, SamplingParams(max_new_tokens=400), cancel)
    next(stream), next(stream)  # decoding
    results = {}
    neighbour = threading.Thread(target=lambda: results.setdefault(
        "neighbour", batching.generate([prompt(10)], SamplingParams(max_new_tokens=8))))
    neighbour.start()
    time.sleep(0.3)
    cancel.set()
    final = [delta for delta in stream][-1].completion
    neighbour.join(timeout=120)
    assert final.finish_reason == "cancelled" and final.completion_tokens < 400
    assert results["neighbour"][0][0].completion_tokens == 8
    with pytest.raises(BadInputError, match="at most"):  # a bad call fails alone, before it joins
        batching.generate([Prompt.of([{"role": "user", "content": "word " * 9000}])], SamplingParams())
    assert batching.generate([prompt(11)], SamplingParams(max_new_tokens=4))[0][0].completion_tokens == 4


def test_server_clients_share_decoding_steps_and_get_what_they_get_alone(fp32_engine):
    thinker = Thinker(engine=fp32_engine, max_new_tokens=12, think=False)
    questions = [f"Marker {i}: what is {i} plus {i}?" for i in range(8)]

    def ask(client, i):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": questions[i]}], max_tokens=12,
                      temperature=0.8, seed=100 + i)
        if i % 2:
            return client.chat.completions.create(**kwargs).choices[0].message.reasoning_content or ""
        return "".join((getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content
                       or "") for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)

    def run(config):
        with BackgroundServer(create_app(thinker, config)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=300)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: ask(client, i), range(8)))
            return answers, fp32_engine.batcher.stats["most_calls"] if fp32_engine.batcher else 1

    alone, _ = run(ServerConfig(max_batch=1))
    together, most_calls = run(ServerConfig())
    assert together == alone and all(alone)
    assert most_calls > 2
    assert fp32_engine.batcher is None  # the server switched it back off when it stopped
