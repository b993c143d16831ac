"""The OpenAI-compatible engine against thinktime's own server on the loopback: real HTTP, the real
embedded model behind it, tiny token counts (the machines are 2 shared CPU cores)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from thinktime import Thinker
from thinktime.engines import create_engine
from thinktime.engines.openai import OpenAIEngine
from thinktime.engines.openai_chunks import Choice, share
from thinktime.engines.openai_http import normalise_base_url
from thinktime.errors import EngineError
from thinktime.reasoning import split_reasoning
from thinktime.types import Prompt, SamplingParams

pytest.importorskip("thinktime.server.background", reason="thinktime's own server is not in this tree")
from thinktime.server.app import ServerConfig, create_app  # noqa: E402
from thinktime.server.background import BackgroundServer, free_port  # noqa: E402

KEY = "sk-engine-test"
QUESTION = Prompt.of([{"role": "system", "content": "You are a careful calculator."},
                      {"role": "user", "content": "What is 12 + 30?"}])


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(Thinker(engine=engine, max_new_tokens=24), ServerConfig(api_key=KEY, max_n=4))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def remote(server):
    engine = OpenAIEngine(base_url=server.url + "/v1", api_key=KEY)
    yield engine
    engine.close()


def scheduler(server):
    return server.app.state.service.scheduler


# --- pure pieces ----------------------------------------------------------------------------------

def test_base_url_forms():
    assert normalise_base_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_base_url("http://h:1/") == "http://h:1/v1"
    assert normalise_base_url("https://api.example.com/beta") == "https://api.example.com/beta"
    assert normalise_base_url("http://h:1/v1/chat/completions") == "http://h:1/v1"


def test_usage_shared_among_samples_sums_exactly():
    parts = share(101, {0: 10, 1: 30, 2: 0})
    assert sum(parts.values()) == 101 and parts[1] > parts[0] > parts[2] >= 0
    assert share(7, {0: 0, 1: 0}) in ({0: 4, 1: 3}, {0: 3, 1: 4})


def test_separate_reasoning_folds_back_into_think_tags():
    choice = Choice()
    pieces = [choice.add_reasoning("12 + 30 "), choice.add_reasoning("is 42."), choice.add_content("\\boxed{42}"),
              choice.close("stop")]
    assert "".join(pieces) == choice.text == "<think>12 + 30 is 42.</think>\\boxed{42}"
    split = split_reasoning(choice.text)
    assert (split.reasoning, split.answer) == ("12 + 30 is 42.", "\\boxed{42}")
    cut = Choice()
    cut.add_reasoning("still thinking")
    assert cut.close("length") == "" and split_reasoning(cut.text).reasoning == "still thinking"


def test_reasoning_sent_after_the_answer_began_stays_where_it_came():
    # Some servers interleave: the streamed pieces and the final text must still agree, and the
    # answer must not end up hidden inside a think block.
    choice = Choice()
    pieces = [choice.add_reasoning("think. "), choice.add_content("So "), choice.add_reasoning("(check) "),
              choice.add_content("\\boxed{4}"), choice.close("stop")]
    assert "".join(pieces) == choice.text == "<think>think. </think>So (check) \\boxed{4}"
    late = Choice()
    pieces = [late.add_content("It is "), late.add_reasoning("hmm "), late.add_content("\\boxed{4}"),
              late.close("stop")]
    assert "".join(pieces) == late.text == "It is hmm \\boxed{4}"
    assert split_reasoning(late.text).answer == "It is hmm \\boxed{4}"


# --- against the live server ------------------------------------------------------------------------

def test_picks_the_served_model_and_its_alias(remote):
    assert remote.model_name == "smollm2-135m"
    assert remote.spec is not None and remote.spec.alias == "smollm2-135m"
    assert remote.count_tokens("hello world") > 0


def test_greedy_answer_matches_the_local_engine(remote, engine):
    params = SamplingParams(max_new_tokens=24)
    [[local]] = engine.generate([QUESTION], params)
    [[over_http]] = remote.generate([QUESTION], params)
    # The server sends reasoning and answer apart; the engine folds them back: the same split results.
    assert split_reasoning(over_http.text) == split_reasoning(local.text)
    assert over_http.finish_reason == local.finish_reason
    assert over_http.prompt_tokens == local.prompt_tokens
    assert over_http.completion_tokens == local.completion_tokens


def test_n_samples_for_many_prompts_with_exact_usage(remote):
    other = Prompt.of([{"role": "user", "content": "Name a colour."}])
    rows = remote.generate([QUESTION, other], SamplingParams(max_new_tokens=12, temperature=0.9, n=3, seed=7))
    assert [len(r) for r in rows] == [3, 3]
    for row in rows:
        assert all(c.finish_reason in ("stop", "length") and 0 < c.completion_tokens <= 12 * 3 for c in row)
        assert sum(c.completion_tokens for c in row) <= 36
    assert remote.supports_n is True


def test_stream_pieces_join_to_the_final_text(remote):
    deltas = list(remote.stream(QUESTION, SamplingParams(max_new_tokens=20, temperature=0.8, n=2, seed=3)))
    finals = {d.index: d.completion for d in deltas if d.completion is not None}
    assert sorted(finals) == [0, 1]
    for index, completion in finals.items():
        assert "".join(d.text for d in deltas if d.index == index) == completion.text
    assert len([d for d in deltas if d.text]) > 4  # streamed in pieces, not whole


def test_stop_strings_are_not_part_of_the_text(remote):
    [[c]] = remote.generate([QUESTION], SamplingParams(max_new_tokens=24, stop=(" ",)))
    assert " " not in c.text and c.finish_reason == "stop"


def test_cancel_closes_the_stream_and_keeps_the_text(remote, server):
    cancel = threading.Event()
    long = Prompt.of([{"role": "user", "content": "Tell a long story about a dragon."}])
    started = time.perf_counter()
    pieces = []
    for delta in remote.stream(long, SamplingParams(max_new_tokens=4000, temperature=0.7, seed=1), cancel):
        pieces.append(delta)
        if len(pieces) == 3:
            cancel.set()
    assert time.perf_counter() - started < 60
    final = pieces[-1].completion
    assert final is not None and final.finish_reason == "cancelled"
    deadline = time.monotonic() + 20  # the server noticed the closed connection and stopped generating
    while scheduler(server).running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not scheduler(server).running


def test_n_over_the_servers_limit_falls_back_to_parallel_requests(server):
    engine = OpenAIEngine(base_url=server.url, api_key=KEY)  # no /v1: added
    try:
        [row] = engine.generate([QUESTION], SamplingParams(max_new_tokens=6, temperature=0.9, n=5, seed=11))
        assert len(row) == 5 and all(c.completion_tokens > 0 for c in row)
        assert engine.supports_n is False  # the server refused n=5 (max_n=4): five requests of n=1
    finally:
        engine.close()


def test_retries_when_the_queue_is_full(server, caplog):
    caplog.set_level("INFO", logger="thinktime.engines.openai")
    queue = scheduler(server)
    old = queue.max_queue
    queue.max_queue = 0  # every request is refused until the queue opens again, half a second later
    reopen = threading.Timer(0.5, lambda: setattr(queue, "max_queue", old))
    engine = OpenAIEngine(base_url=server.url + "/v1", api_key=KEY, max_parallel=6, max_retries=8)
    reopen.start()
    try:
        prompts = [Prompt.of([{"role": "user", "content": f"Say the number {i}."}]) for i in range(6)]
        rows = engine.generate(prompts, SamplingParams(max_new_tokens=4))
        assert len(rows) == 6 and all(r[0].finish_reason in ("stop", "length") for r in rows)
        assert any("HTTP 429" in r.getMessage() for r in caplog.records)  # it was refused, then retried
    finally:
        reopen.join()
        engine.close()


def test_errors_say_what_to_do(server):
    with pytest.raises(EngineError) as refused:
        OpenAIEngine(base_url=server.url + "/v1", api_key="wrong").generate([QUESTION], SamplingParams(max_new_tokens=2))
    assert "API key" in refused.value.message and refused.value.exit_code == 6
    started = time.perf_counter()
    with pytest.raises(EngineError) as unreachable:
        OpenAIEngine(base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert "cannot reach" in unreachable.value.message and time.perf_counter() - started < 10
    with pytest.raises(Exception) as unknown:
        OpenAIEngine("no-such-model", base_url=server.url + "/v1", api_key=KEY)
    assert "smollm2-135m" in str(unknown.value)


def test_prefix_continuation_needs_a_server_that_supports_it(remote):
    # thinktime's server answers user turns only: continuing a partial reply is refused, clearly, and as the
    # request's fault (exit 2; a thinktime server in front passes it on as a 400, not a 502)
    from thinktime.errors import BadInputError

    with pytest.raises(BadInputError) as refused:
        remote.generate([Prompt(QUESTION.messages, prefix="Let me")], SamplingParams(max_new_tokens=4))
    assert "HTTP 400" in refused.value.message and refused.value.exit_code == 2


def test_a_strategy_with_a_seed_answers_through_the_server(server):
    thinker = Thinker(engine=create_engine(f"openai:{server.url}/v1", None, api_key=KEY), max_new_tokens=24,
                      temperature=0.8, seed=5, strategy="self-consistency")
    result = thinker.solve("What is 3 + 4?", options={"n": 3})
    assert result.strategy == "self-consistency" and len(result.candidates) == 3
    assert result.usage.completion_tokens > 0 and result.model == "smollm2-135m"


def test_cli_solve_through_the_server(server):
    cmd = [sys.executable, "-c", "from thinktime.cli import main; main()", "solve", "--json", "--engine",
           f"openai:{server.url}/v1", "--api-key", KEY, "--max-new-tokens", "16", "What is 2+3?"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["model"] == "smollm2-135m" and record["usage"]["completion_tokens"] > 0
    bad = subprocess.run(cmd[:3] + ["solve", "--engine", "transformers", "--base-url", "http://x", "1+1?"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--base-url" in bad.stderr
