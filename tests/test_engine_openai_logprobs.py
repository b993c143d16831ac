"""The OpenAI engine's log-probabilities over real HTTP, from thinktime's own server on the llama.cpp engine: the
same numbers the engine behind it gives, and the confidence rules of self-consistency through them."""
from __future__ import annotations

import pytest

from thinktime import Thinker
from thinktime.engines.openai import OpenAIEngine
from thinktime.server.app import ServerConfig, create_app
from thinktime.server.background import BackgroundServer
from thinktime.types import Prompt, SamplingParams

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")

PROMPT = Prompt.of([{"role": "user", "content": "What is 3 + 4?"}])


@pytest.fixture(scope="module")
def remote(llama_engine):
    with BackgroundServer(create_app(Thinker(engine=llama_engine, max_new_tokens=16, think=False),
                                     ServerConfig(max_n=4))) as running:
        engine = OpenAIEngine("smollm2-135m", base_url=running.url + "/v1")
        yield engine
        engine.close()


def test_logprobs_over_http_are_the_served_engines_own(remote, llama_engine):
    assert remote.returns_logprobs
    params = SamplingParams(max_new_tokens=8, logprobs=3)
    [[here]] = llama_engine.generate([PROMPT], params)
    [[there]] = remote.generate([PROMPT], params)
    # the server splits a chain it cannot tell is an answer into reasoning, which the engine folds back in tags
    assert here.text in there.text and there.completion_tokens == here.completion_tokens == len(there.logprobs)
    assert [t.text for t in there.logprobs] == [t.text for t in here.logprobs]
    # The engine here and the one behind the server hold different prompt caches, so a prompt's end is prefilled
    # in another batch shape: llama.cpp's quantised kernels then move a log-probability by up to about 0.1 for a
    # likely token and 0.5 for an unlikely one, which can swap two near-tied alternatives below the first.
    assert [t.logprob for t in there.logprobs] == pytest.approx([t.logprob for t in here.logprobs], abs=0.25)
    assert [t.top[0][1] for t in there.logprobs] == [t.top[0][1] for t in here.logprobs]
    for served, own in zip(there.logprobs, here.logprobs):
        assert len(served.top) == len(own.top) == 3
        mine = {text: lp for _, text, lp in own.top}
        assert all(lp == pytest.approx(mine[text], abs=0.6) for _, text, lp in served.top if text in mine)
    streamed = [d.completion for d in remote.stream(PROMPT, params) if d.completion is not None]
    assert [t.text for t in streamed[0].logprobs] == [t.text for t in here.logprobs]
    assert [t.logprob for t in streamed[0].logprobs] == pytest.approx([t.logprob for t in here.logprobs], abs=0.25)
    [[plain]] = remote.generate([PROMPT], SamplingParams(max_new_tokens=4))
    assert plain.logprobs is None  # asked for per call: nobody pays when nobody reads them


def test_confidence_weighted_self_consistency_through_the_openai_engine(remote):
    thinker = Thinker(engine=remote, max_new_tokens=12, think=False, seed=5, temperature=0.8)
    result = thinker.solve("What is 3 + 4?", strategy="self-consistency",
                           options={"n": 4, "round": 2, "weights": "confidence", "early_stop": True, "window": 4})
    chains = result.details["confidence"]["chains"]
    assert len(chains) == result.details["samples"] and all(c is not None and c > 0 for c in chains)
    assert result.details["confidence"]["stop_level"] is not None  # learnt from the first round of two
