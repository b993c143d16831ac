"""The transformers engine on the real embedded model, loaded through the real loader."""
from __future__ import annotations

import threading
import time

import pytest

from thinktime import models
from thinktime.errors import BadInputError
from thinktime.types import Prompt, SamplingParams

QUESTION = [{"role": "system", "content": "You are a careful calculator."},
            {"role": "user", "content": "What is 12 + 30?"}]


def test_embedded_model_loads_from_the_wheel_through_the_cache(engine):
    assert engine.model_name == "smollm2-135m"
    gguf = models.embedded_gguf()
    assert gguf is not None and gguf.name == models.EMBEDDED_FILE
    cached = models.models_dir() / "smollm2-135m"
    assert (cached / "model.safetensors").is_file()  # dequantised once, reloaded from safetensors
    started = time.perf_counter()
    models.resolve("smollm2-135m")  # second resolution: no conversion
    assert time.perf_counter() - started < 2.0
    assert 2 in engine.stop_ids  # <|im_end|> ends the turn


def test_system_prompt_reaches_the_tokens_through_the_chat_template(engine):
    rendered = engine.render(Prompt.of(QUESTION))
    assert rendered.startswith("<|im_start|>system\nYou are a careful calculator.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = engine.tokenizer(rendered, add_special_tokens=False).input_ids
    system_ids = engine.tokenizer("You are a careful calculator.", add_special_tokens=False).input_ids
    assert any(ids[i:i + len(system_ids)] == system_ids for i in range(len(ids)))


def test_prefix_continues_the_assistant_turn(engine):
    rendered = engine.render(Prompt.of(QUESTION, prefix="Let me think."))
    assert rendered.endswith("<|im_start|>assistant\nLet me think.")


def test_greedy_stream_equals_generate(engine):
    params = SamplingParams(max_new_tokens=40)
    [[whole]] = engine.generate([Prompt.of(QUESTION)], params)
    deltas = list(engine.stream(Prompt.of(QUESTION), params))
    streamed = "".join(d.text for d in deltas)
    assert streamed == whole.text
    assert len([d for d in deltas if d.text]) > 3  # real streaming: many pieces, not one
    final = deltas[-1].completion
    assert final is not None and final.token_ids == whole.token_ids
    assert final.completion_tokens == whole.completion_tokens


def test_only_new_tokens_are_decoded_and_counted_exactly(engine):
    [[c]] = engine.generate([Prompt.of(QUESTION)], SamplingParams(max_new_tokens=30))
    assert "careful calculator" not in c.text  # the seed decoded the prompt back into the answer
    assert c.prompt_tokens == engine.count_tokens(engine.render(Prompt.of(QUESTION)))
    expected = len(c.token_ids) + (1 if c.finish_reason == "stop" else 0)
    assert c.completion_tokens == expected
    assert c.completion_tokens <= 30


def test_length_finish_reason_when_the_limit_cuts(engine):
    [[c]] = engine.generate([Prompt.of(QUESTION)], SamplingParams(max_new_tokens=3))
    assert c.finish_reason == "length"
    assert c.completion_tokens == 3


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, n=3, seed=1234)
    first = [c.text for c in engine.generate([Prompt.of(QUESTION)], params)[0]]
    again = [c.text for c in engine.generate([Prompt.of(QUESTION)], params)[0]]
    other = [c.text for c in engine.generate([Prompt.of(QUESTION)],
                                             SamplingParams(max_new_tokens=24, temperature=1.0, n=3, seed=99))[0]]
    assert first == again
    assert len(first) == 3
    assert other != first


def test_many_prompts_in_one_batch_with_left_padding(engine):
    short = Prompt.of([{"role": "user", "content": "Hi"}])
    long = Prompt.of([{"role": "user", "content": "Please add these numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9."}])
    params = SamplingParams(max_new_tokens=12)
    batched = engine.generate([short, long], params)
    assert engine.tokenizer.padding_side == "left"
    assert [len(r) for r in batched] == [1, 1]
    alone = engine.generate([long], params)[0][0]
    assert batched[1][0].prompt_tokens == alone.prompt_tokens
    assert batched[0][0].prompt_tokens < batched[1][0].prompt_tokens
    # Left padding keeps the last prompt token at the end, so greedy output starts the same.
    assert batched[1][0].token_ids[:4] == alone.token_ids[:4]


def test_stop_strings_end_the_text_and_are_left_out(engine):
    params = SamplingParams(max_new_tokens=40, stop=(" ",))
    [[c]] = engine.generate([Prompt.of(QUESTION)], params)
    assert " " not in c.text
    assert c.finish_reason == "stop"
    streamed = "".join(d.text for d in engine.stream(Prompt.of(QUESTION), params))
    assert streamed == c.text


def test_cancel_stops_generation(engine):
    cancel = threading.Event()
    params = SamplingParams(max_new_tokens=400, temperature=1.0, seed=0)
    stream = engine.stream(Prompt.of(QUESTION), params, cancel)
    first = next(stream)
    assert first.text
    cancel.set()
    rest = list(stream)
    final = rest[-1].completion
    assert final.finish_reason in ("cancelled", "stop")
    assert final.completion_tokens < 400


def test_a_stream_run_to_its_end_leaves_cancel_unset_and_one_left_early_sets_it(engine):
    """The same event guards a strategy's later calls (reflect's check, budget forcing's Wait): a finished
    stream must not set it, or every later call of the strategy returns nothing."""
    cancel = threading.Event()
    deltas = list(engine.stream(Prompt.of(QUESTION), SamplingParams(max_new_tokens=4), cancel))
    assert deltas[-1].completion is not None and not cancel.is_set()
    stream = engine.stream(Prompt.of(QUESTION), SamplingParams(max_new_tokens=40, temperature=1.0, seed=0), cancel)
    next(stream)
    stream.close()  # the caller leaves (Ctrl-C, a closed connection): the generation stops
    assert cancel.is_set()


def test_a_cut_never_ends_in_half_a_character(engine):
    """Chinese characters take several byte tokens: a chain cut between them would end in U+FFFD."""
    from thinktime import Thinker

    # with the thinking prompt, this question's greedy chain cuts a character in two at 5, 7, 9, 11 tokens
    prompt = Prompt.of(Thinker(engine=engine).messages("一个数加上7等于15，这个数是多少？"))
    for k in (5, 9):
        [[completion]] = engine.generate([prompt], SamplingParams(max_new_tokens=k))
        streamed = "".join(d.text for d in engine.stream(prompt, SamplingParams(max_new_tokens=k)))
        assert "\ufffd" not in completion.text and streamed == completion.text


def test_prompt_longer_than_the_context_is_refused(engine):
    huge = Prompt.of([{"role": "user", "content": "word " * (engine.context_length + 10)}])
    with pytest.raises(BadInputError, match="takes at most"):
        engine.generate([huge], SamplingParams(max_new_tokens=4))


def test_vllm_gets_every_core_of_a_small_cpu_unless_told_otherwise():
    """vLLM keeps one core per rank out of its compute threads; on 2 cores that halves its speed (docs/performance.md)."""
    from thinktime.engines.vllm_setup import cpu_thread_settings

    assert cpu_thread_settings(2, 1, 1, {}) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_settings(1, 1, 1, {}) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_settings(16, 1, 1, {}) == {}  # one core of many: vLLM's own choice
    assert cpu_thread_settings(2, 2, 1, {}) == {}  # several ranks: each needs its own cores
    assert cpu_thread_settings(2, 1, 2, {}) == {}
    assert cpu_thread_settings(2, 1, 1, {"VLLM_CPU_OMP_THREADS_BIND": "0"}) == {}  # the user's word wins
    assert cpu_thread_settings(2, 1, 1, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) == {}


def test_a_seeded_sample_is_a_prefix_of_the_same_sample_with_more_room(engine):
    """Every row's draws follow the steps, so a budget or the context cutting max_new_tokens cuts, never changes,
    a seeded sample (the second sample too, not only the first)."""
    prompt = Prompt.of([{"role": "user", "content": "Tell me a story."}])
    short, long = (engine.generate([prompt], SamplingParams(max_new_tokens=k, n=2, temperature=1.0, seed=7))[0]
                   for k in (6, 12))
    for a, b in zip(short, long):
        assert b.token_ids[:len(a.token_ids)] == a.token_ids


def test_a_closed_engine_frees_its_model_and_says_so():
    import gc
    import weakref

    from thinktime.engines.hf import TransformersEngine
    from thinktime.errors import ThinktimeError

    engine = TransformersEngine("smollm2-135m")
    engine.generate([Prompt.of(QUESTION)], SamplingParams(max_new_tokens=2))
    model = weakref.ref(engine.model)
    engine.close()
    gc.collect()
    assert model() is None  # nothing (prefix cache, lean step) keeps the weights alive
    with pytest.raises(ThinktimeError, match="closed"):
        engine.generate([Prompt.of(QUESTION)], SamplingParams(max_new_tokens=2))


def test_vllm_refuses_the_transformers_only_fast_option_before_loading():
    from thinktime.engines.vllm import VLLMEngine

    with pytest.raises(BadInputError, match="transformers engine only"):
        VLLMEngine("smollm2-135m", fast=False)  # `solve --engine vllm --no-fast` failed inside vLLM's EngineArgs


def test_running_out_of_memory_is_a_clear_error_and_the_engine_serves_on(engine, monkeypatch):
    # The allocator's failure is simulated (a real one would need a GPU filled to the brim); what is
    # under test is that it reaches the user as exit 5 with what to do, and that the engine recovers.
    import torch

    from thinktime.errors import InsufficientMemoryError

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    params = SamplingParams(max_new_tokens=4, n=3, temperature=0.7, seed=0)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "_decode", out_of_memory)
        with pytest.raises(InsufficientMemoryError) as info:
            engine.generate([Prompt.of(QUESTION)], params)
        assert info.value.exit_code == 5 and "3 row(s)" in str(info.value) and "fewer samples" in info.value.hint
        with pytest.raises(InsufficientMemoryError):
            list(engine.stream(Prompt.of(QUESTION), params))
    [completions] = engine.generate([Prompt.of(QUESTION)], params)
    assert len(completions) == 3 and all(c.completion_tokens >= 1 for c in completions)


def test_only_floating_point_dtypes_are_accepted():
    from thinktime.engines.device import pick_dtype

    for bad in ("int8", "Tensor", "cuda", "bf17"):
        with pytest.raises(BadInputError, match="unknown dtype"):
            pick_dtype(bad, "cpu", 1)
    import torch

    assert pick_dtype("BF16", "cpu", 1) is torch.bfloat16 and pick_dtype("float32", "cpu", 1) is torch.float32
