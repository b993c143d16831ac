"""The llama.cpp engine on the embedded GGUF, through llama-cpp-python (the `llamacpp` extra; `make test` installs
it). Its peer for exactness is llama.cpp's own decoding of the same tokens through the high-level `Llama`."""
from __future__ import annotations

import threading
import time

import pytest

from test_strategies_e2e import SMALL
from thinktime.errors import BadInputError, ThinktimeError
from thinktime.types import Prompt, SamplingParams

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install "
                                                    "'thinktime[llamacpp]' (make test installs it)")

QUESTION = Prompt.of([{"role": "user", "content": "Name three colours of the rainbow."}])
OTHER = Prompt.of([{"role": "system", "content": "You are a careful assistant."},
                   {"role": "user", "content": "What is 12 + 30?"}])


@pytest.fixture(scope="module")
def llama(llama_engine):
    return llama_engine


def reference_greedy(engine, prompt: Prompt, tokens: int) -> list[int]:
    """llama.cpp's own greedy decode of the same tokens, one sequence, through the high-level Llama class, with
    the attention kernel the engine's context gets (llama.cpp's default; the class turns flash attention off)."""
    from llama_cpp import Llama

    llm = Llama(str(engine.path), n_ctx=2048, n_threads=engine.threads, verbose=False, flash_attn=True)
    ids = llm.tokenize(engine.render(prompt).encode(), add_bos=False, special=True)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if llm._model.token_eos() == token or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) \
                or len(out) == tokens:
            break
        out.append(token)
    llm.close()
    return out


def test_the_embedded_gguf_runs_on_its_own_weights(llama):
    from thinktime.models import embedded_gguf

    assert llama.path == embedded_gguf() and llama.model_name == "smollm2-135m"
    assert llama.context_length == 8192
    text = llama.render(OTHER)
    assert "You are a careful assistant." in text and text.rstrip().endswith("assistant")


@pytest.fixture
def fresh_llama(embedded_gguf_path):
    """An engine with an empty KV cache: where a row's cells lie in the cache sets the order attention sums them
    in, so exact greedy equality holds for the same cache state (docs: engines, near-ties)."""
    from thinktime.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(str(embedded_gguf_path))
    yield engine
    engine.close()


def test_greedy_equals_llama_cpps_own_decode_of_the_same_prompt(fresh_llama):
    llama = fresh_llama
    (completion,), = llama.generate([QUESTION], SamplingParams(max_new_tokens=40))
    assert completion.token_ids == reference_greedy(llama, QUESTION, 40)[: len(completion.token_ids)]
    assert completion.completion_tokens == len(completion.token_ids) + (1 if completion.ended_turn else 0)
    assert completion.prompt_tokens == llama.count_tokens(llama.render(QUESTION))


def test_prompts_batched_together_are_one_call_and_reproduce_on_the_same_cache(embedded_gguf_path):
    """Two prompts decode in one batch and each gets its own rows; the same call on an engine in the same state
    gives the same text (a row's logits depend on the rows beside it, so equality with a lone call is not
    promised: docs/engines.md, near-ties)."""
    from thinktime.engines.llamacpp import LlamaCppEngine

    params = SamplingParams(max_new_tokens=24, temperature=0.7, n=2, seeds=(1, 2))
    runs = []
    for _ in range(2):
        engine = LlamaCppEngine(str(embedded_gguf_path))
        runs.append(engine.generate([QUESTION, OTHER], params))
        counts = [engine.count_tokens(engine.render(p)) for p in (QUESTION, OTHER)]
        engine.close()
    assert [[c.text for c in row] for row in runs[0]] == [[c.text for c in row] for row in runs[1]]
    assert [row[0].prompt_tokens for row in runs[0]] == counts


def test_n_samples_share_the_prompt_and_seeds_reproduce(llama):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=11)
    first = llama.generate([QUESTION], params)[0]
    again = llama.generate([QUESTION], params)[0]
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1  # four draws, not one copied
    other_seed = llama.generate([QUESTION], SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=12))[0]
    assert [c.text for c in other_seed] != [c.text for c in first]


def test_a_prefix_continues_the_reply_and_reuses_the_cached_chain(llama):
    params = SamplingParams(max_new_tokens=30)
    (full,), = llama.generate([QUESTION], params)
    cut = full.token_ids[:10]
    prefix = llama.native.tokenize  # the prefix's text must tokenize back to the same ids to compare exactly
    head = b"".join(llama.native.piece(t) for t in cut).decode()
    continued = Prompt(QUESTION.messages, head)
    assert llama.render(continued).endswith(head)
    (rest,), = llama.generate([continued], SamplingParams(max_new_tokens=20))
    if prefix(llama.render(continued))[-len(cut):] == cut:
        assert (head + rest.text).startswith(full.text[: len(head) + 20][: len(head + rest.text)])
    assert rest.prompt_tokens == llama.count_tokens(llama.render(continued))


def test_stop_strings_end_the_text_and_are_never_streamed(llama):
    params = SamplingParams(max_new_tokens=60, stop=("\n",))
    (completion,), = llama.generate([QUESTION], params)
    assert "\n" not in completion.text
    if completion.finish_reason == "stop" and not completion.ended_turn:
        streamed = "".join(d.text for d in llama.stream(QUESTION, params))
        assert streamed == completion.text


def test_a_stream_joins_to_the_final_text_and_carries_the_completion(llama):
    params = SamplingParams(max_new_tokens=24, temperature=0.8, n=2, seed=3)
    deltas = list(llama.stream(QUESTION, params))
    finals = {d.index: d.completion for d in deltas if d.completion is not None}
    assert sorted(finals) == [0, 1]
    for index, completion in finals.items():
        assert "".join(d.text for d in deltas if d.index == index) == completion.text


def test_length_cut_and_exact_counts(llama):
    (completion,), = llama.generate([OTHER], SamplingParams(max_new_tokens=3))
    assert completion.finish_reason in ("length", "stop") and completion.completion_tokens <= 3
    if completion.finish_reason == "length":
        assert completion.completion_tokens == 3 and not completion.ended_turn


def test_cancel_stops_the_rows_between_steps(llama):
    cancel = threading.Event()
    seen = []
    started = time.monotonic()
    for delta in llama.stream(QUESTION, SamplingParams(max_new_tokens=4000, temperature=1.0, seed=1,
                                                       stop=()), cancel):
        seen.append(delta)
        if len(seen) == 3:
            cancel.set()
    final = [d.completion for d in seen if d.completion is not None]
    assert final and final[0].finish_reason in ("cancelled", "stop")
    assert time.monotonic() - started < 60


def test_calls_from_two_threads_share_the_batch_and_get_their_own_answers(llama):
    """Two callers at once: both are served from the one batch, each with its own prompt's rows, none lost."""
    params = SamplingParams(max_new_tokens=40, temperature=0.7, n=2, seed=9)
    results, errors = {}, []
    started = threading.Barrier(3)

    def ask(key, prompt):
        started.wait()
        try:
            results[key] = llama.generate([prompt], params)[0]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(k, p)) for k, p in enumerate((QUESTION, OTHER, QUESTION))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(results) == [0, 1, 2]
    counts = [llama.count_tokens(llama.render(p)) for p in (QUESTION, OTHER, QUESTION)]
    assert [[c.prompt_tokens for c in results[k]] for k in range(3)] == [[n, n] for n in counts]
    assert all(c.completion_tokens >= 1 and c.finish_reason in ("stop", "length") for k in results for c in results[k])


def test_a_prompt_longer_than_the_context_is_bad_input(llama):
    long = Prompt.of([{"role": "user", "content": "word " * 9000}])
    with pytest.raises(BadInputError, match="takes at most"):
        llama.generate([long], SamplingParams(max_new_tokens=4))
    (completion,), = llama.generate([OTHER], SamplingParams(max_new_tokens=4))  # and it serves on
    assert completion.completion_tokens >= 1


def test_more_rows_than_the_batch_holds_wait_their_turn(embedded_gguf_path):
    from thinktime.engines.llamacpp import LlamaCppEngine

    small = LlamaCppEngine(str(embedded_gguf_path), max_batch_rows=2, kv_cells=4096)
    try:
        out = small.generate([QUESTION, OTHER], SamplingParams(max_new_tokens=8, temperature=0.7, n=3, seed=2))
        assert [len(row) for row in out] == [3, 3]
        assert all(c.completion_tokens >= 1 for row in out for c in row)
    finally:
        small.close()
    with pytest.raises(ThinktimeError, match="closed"):
        small.generate([QUESTION], SamplingParams(max_new_tokens=2))


def test_a_broken_gguf_and_wrong_options_are_clear_errors(tmp_path, embedded_gguf_path):
    from thinktime.engines import create_engine
    from thinktime.errors import ModelNotFoundError

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(embedded_gguf_path.read_bytes()[: 1 << 20])
    with pytest.raises(BadInputError, match="could not load"):
        create_engine("llamacpp", str(broken))
    with pytest.raises(ModelNotFoundError):
        create_engine("llamacpp", str(tmp_path / "missing.gguf"))
    with pytest.raises(BadInputError, match="dtype"):
        create_engine("llamacpp", "smollm2-135m", dtype="fp32")
    with pytest.raises(BadInputError, match="CPU"):
        create_engine("llamacpp", "smollm2-135m", device="cuda")


def test_a_gguf_without_a_chat_template_is_not_a_chat_model(tmp_path, embedded_gguf_path):
    gguf = pytest.importorskip("gguf")
    from thinktime.engines import create_engine

    reader = gguf.GGUFReader(str(embedded_gguf_path))
    writer = gguf.GGUFWriter(str(tmp_path / "base.gguf"), arch=str(bytes(reader.fields["general.architecture"]
                                                                          .parts[-1]), "utf-8"))
    for field in reader.fields.values():
        if field.name in ("tokenizer.chat_template", "general.architecture") or field.name.startswith("GGUF."):
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BadInputError, match="not a chat model"):
        create_engine("llamacpp", str(tmp_path / "base.gguf"))


def test_auto_picks_llamacpp_for_a_gguf_and_transformers_otherwise(tmp_path):
    from thinktime.engines import pick_engine

    assert pick_engine("smollm2-135m") == "llamacpp"
    assert pick_engine("smollm2-135m", "cpu") == "llamacpp"
    assert pick_engine(str(tmp_path)) == "transformers"  # a folder without a GGUF


STRATEGY_OPTIONS = {"cot": {}, **SMALL}  # the tiny sizes the transformers engine's end-to-end tests use


@pytest.mark.parametrize("strategy", sorted(STRATEGY_OPTIONS))
def test_every_strategy_runs_through_llamacpp(llama, strategy):
    from thinktime import Thinker

    thinker = Thinker(engine=llama, think=strategy == "budget", max_new_tokens=20)
    result = thinker.solve("What is 3 + 4?", strategy=strategy, options=STRATEGY_OPTIONS[strategy], seed=3,
                           budget_tokens=200)
    assert result.strategy == strategy and result.candidates
    assert 0 < result.usage.completion_tokens <= 200
    assert result.details.get("stop_reason") or strategy == "cot"


def test_a_transformers_folder_converts_to_gguf_and_auto_runs_it_on_llamacpp(tmp_path):
    """`thinktime convert` with llama.cpp's own converter (from the installed llama-cpp-python's sdist), on the
    embedded model's transformers copy, as bootstrap's trained folders would be."""
    import shutil

    from typer.testing import CliRunner

    from thinktime import models
    from thinktime.cli import app
    from thinktime.engines import create_engine, pick_engine

    folder = tmp_path / "trained"
    shutil.copytree(models.resolve("smollm2-135m").path, folder)
    assert pick_engine(str(folder)) == "transformers"
    result = CliRunner().invoke(app, ["convert", str(folder), "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert (folder / "model.gguf").is_file() and pick_engine(str(folder)) == "llamacpp"
    engine = create_engine("auto", str(folder))
    try:
        assert engine.name == "llamacpp"
        (completion,), = engine.generate([OTHER], SamplingParams(max_new_tokens=8))
        assert completion.completion_tokens >= 1
    finally:
        engine.close()
    bad = CliRunner().invoke(app, ["convert", str(folder), "--outtype", "q3"])
    assert bad.exit_code == 2 and "unknown GGUF type" in bad.output


def test_log_probabilities_when_asked_and_only_then(llama):
    import math

    (plain,), = llama.generate([OTHER], SamplingParams(max_new_tokens=6))
    assert plain.logprobs is None
    (completion,), = llama.generate([OTHER], SamplingParams(max_new_tokens=6, logprobs=3))
    assert len(completion.logprobs) == completion.completion_tokens
    for entry in completion.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 3
        assert [lp for _, _, lp in entry.top] == sorted((lp for _, _, lp in entry.top), reverse=True)
        assert entry.top[0][2] >= entry.logprob - 1e-9  # greedy: the chosen token is the most likely one
        assert sum(math.exp(lp) for _, _, lp in entry.top) <= 1 + 1e-6
    assert "".join(e.text for e in completion.logprobs if e.id in completion.token_ids) == completion.text
    from thinktime.engines.hf import TransformersEngine  # noqa: F401  (the engines that have none refuse)


def test_settings_it_cannot_serve_are_refused_before_queueing_and_it_serves_on(llama):
    for params in (SamplingParams(n=0), SamplingParams(max_new_tokens=0), SamplingParams(seeds=(1, 2)),
                   SamplingParams(logprobs=10**6), SamplingParams(logprobs=2, stop_below=(0, 1.0)),
                   SamplingParams(stop_below=(8, 1.0))):
        with pytest.raises(BadInputError):
            llama.generate([OTHER], params)
    (completion,), = llama.generate([OTHER], SamplingParams(max_new_tokens=2))
    assert completion.completion_tokens >= 1


def test_a_failing_row_fails_its_own_call_only(llama, monkeypatch):
    real = llama.native.token_logprobs

    def flaky(index, token, top):  # a fault injected into one request's rows: the scheduler must contain it
        if top == 7:
            raise RuntimeError("injected fault")
        return real(index, token, top)

    monkeypatch.setattr(llama.native, "token_logprobs", flaky)
    results, errors = {}, {}

    def run(key, params):
        try:
            results[key] = llama.generate([OTHER], params)
        except RuntimeError as exc:
            errors[key] = exc

    threads = [threading.Thread(target=run, args=("bad", SamplingParams(max_new_tokens=16, logprobs=7))),
               threading.Thread(target=run, args=("good", SamplingParams(max_new_tokens=16, logprobs=1)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "injected" in str(errors["bad"]) and "good" in results and "good" not in errors


def test_small_kv_caches_admit_what_fits_and_closed_engines_say_so(embedded_gguf_path):
    from thinktime.engines.llamacpp import LlamaCppEngine

    small = LlamaCppEngine(str(embedded_gguf_path), kv_cells=256)
    try:
        assert small.context_length < small.native.cells
        long = Prompt.of([{"role": "user", "content": "count: " + " ".join(str(i) for i in range(70))}])
        (first,), = small.generate([long], SamplingParams(max_new_tokens=4))  # leaves a long cache entry
        medium = Prompt.of([{"role": "user", "content": "words: " + "apple " * 50}])
        (second,), = small.generate([medium], SamplingParams(max_new_tokens=8))
        assert first.completion_tokens >= 1 and second.completion_tokens >= 1
        room = small.context_length - second.prompt_tokens
        (clamped,), = small.generate([medium], SamplingParams(max_new_tokens=10 * room))
        assert clamped.completion_tokens <= room
    finally:
        small.close()
    with pytest.raises(ThinktimeError, match="closed"):
        small.count_tokens("hello")


def test_a_llamacpp_process_on_a_cpu_build_of_torch_never_imports_torch():
    """Importing torch takes about a second; the llama.cpp engine and the default-model choice do without it."""
    import subprocess
    import sys
    from importlib import metadata

    if "+cpu" not in metadata.version("torch"):
        pytest.skip("torch here is not a CPU build: it may see a GPU, so choosing a model imports it")
    code = ("import sys\nfrom thinktime.api import Thinker\n"
            "thinker = Thinker(engine='llamacpp', max_new_tokens=4)\n"
            "print(thinker.engine.name, thinker.solve('What is 2 + 3?').usage.completion_tokens, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["llamacpp", "4", "False"]
