"""Schema fuzzing: hypothesis throws structured and unstructured bodies at a live server; every answer
is a 2xx or a 4xx with an OpenAI-style error body, never a 5xx, and the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinktime import Thinker
from thinktime.server.app import ServerConfig, create_app
from thinktime.server.background import BackgroundServer

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def url(engine):
    # Tiny limits, and no thinking system prompt, keep each accepted request cheap on 2 cores.
    app = create_app(Thinker(engine=engine, max_new_tokens=2, think=False), ServerConfig(max_n=2, max_tokens_limit=3))
    with BackgroundServer(app) as server:
        yield server.url


# text with lone surrogates and control characters too: JSON can carry them, tokenizers cannot
texts = st.text(max_size=20) | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=3) \
    | st.text(st.characters(max_codepoint=0x1F), max_size=3)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "bogus"]) | json_values,
     "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                        "text": st.text(max_size=10)}), max_size=2)
     | json_values}), max_size=3)
fields = {
    "model": st.sampled_from([MODEL, f"{MODEL}:cot", f"{MODEL}:self-consistency-2", f"{MODEL}:nope", "x"]) | json_values,
    "messages": messages | json_values,
    "n": st.integers(-2, 4) | json_values,
    "temperature": st.floats(-1, 3) | st.just(float("nan")) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "max_tokens": st.integers(-1, 5) | json_values,
    "max_completion_tokens": st.integers(-1, 5) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "seed": st.integers(-2**70, 2**70) | json_values,
    "stop": texts | st.lists(texts, max_size=6) | json_values,
    "thinktime": st.fixed_dictionaries({}, optional={"strategy": st.sampled_from(["cot", "self-consistency", "zz"]),
                                                     "n": st.integers(-1, 2), "budget_tokens": st.integers(-1, 4),
                                                     "lang": st.sampled_from(["en", "zh", "xx"])}) | json_values,
}
bodies = st.fixed_dictionaries({}, optional=fields) | json_values


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies)
def test_fuzzed_bodies_never_5xx(url, body):
    raw = json.dumps(body, allow_nan=True)
    with httpx.stream("POST", url + "/v1/chat/completions", content=raw, timeout=300,
                      headers={"content-type": "application/json"}) as response:
        response.read()
    check(response)
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in response.text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(changes=st.fixed_dictionaries({}, optional=fields).filter(lambda d: 0 < len(d) <= 2))
def test_one_or_two_fields_off_a_valid_request(url, changes):
    """Near-valid requests reach generation, streaming included: still never a 5xx."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 2} | changes
    with httpx.stream("POST", url + "/v1/chat/completions", content=json.dumps(body, allow_nan=True), timeout=300,
                      headers={"content-type": "application/json"}) as response:
        response.read()
    check(response)
    STATUS.append(response.status_code)


STATUS: list[int] = []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_5xx(url, raw):
    check(httpx.post(url + "/v1/chat/completions", content=raw, timeout=300))


def test_still_serving_after_fuzzing(url):
    if STATUS:  # the near-valid requests reached the model, not only the validator
        assert STATUS.count(200) >= 5, STATUS
    response = httpx.post(url + "/v1/chat/completions", timeout=300,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
