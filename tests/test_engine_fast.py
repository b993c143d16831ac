"""The fast decoder (thinktime/engines/fast.py) on the CPU: the code path CUDA runs, minus graph capture.

Greedy tokens must equal plain `generate`'s, on tiny random Llama / InternLM3 / Qwen3 models and on
the embedded model through the engine; samples are reproducible by seed; stop ids, stop strings,
streaming and cancel behave as with `generate`.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from thinktime.engines import fast
from thinktime.engines.decode_ops import sample
from thinktime.engines.fast import FastDecoder
from thinktime.engines.fast_support import FastPathUnavailable, unsupported_reason
from thinktime.engines.hf import TransformersEngine
from thinktime.types import Prompt, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


def tiny(kind: str = "llama", **extra):
    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    shape.update(extra)
    cls = {"llama": transformers.LlamaConfig, "qwen3": getattr(transformers, "Qwen3Config", None),
           "internlm3": getattr(transformers, "InternLM3Config", None)}[kind]
    if cls is None:
        pytest.skip(f"this transformers has no {kind} config")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**shape)).eval()
    with torch.no_grad():  # larger weights than the default init: decisive logits, varied tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model


def reference(model, prompt: list[int], new: int, **kwargs) -> list[int]:
    kwargs.setdefault("eos_token_id", None)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def prompts(n: int, length: int, vocab: int = 384, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length - 7 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    return model, FastDecoder(model)


@pytest.mark.parametrize("kind,extra", [
    ("llama", {}),
    ("internlm3", {"attention_bias": True, "mlp_bias": True,  # InternLM3's qkv_bias/bias, and its dynamic RoPE
                   "rope_parameters": {"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000.0}}),
    ("qwen3", {"attention_bias": True}),  # per-head q/k norms
])
def test_greedy_equals_generate_on_tiny_models(kind, extra):
    model = tiny(kind, **extra)
    decoder = FastDecoder(model)
    batch = prompts(3, 40)
    rows = decoder.generate(batch, max_new_tokens=40, greedy=True)
    for prompt, row in zip(batch, rows):
        assert row == reference(model, prompt, 40)
    assert len({tuple(r) for r in rows}) == 3  # real, varied output, not one token repeated


def test_sdpa_attention_variant_equals_generate():
    model = tiny("llama")
    decoder = FastDecoder(model, attention="sdpa")
    batch = prompts(2, 40)
    assert decoder.generate(batch, max_new_tokens=24) == [reference(model, p, 24) for p in batch]


def test_generate_still_works_on_the_fused_weights(llama):
    model, decoder = llama
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == decoder.layers[0].qkv_w.data_ptr()  # a view: nothing duplicated
    prompt = prompts(1, 30)[0]
    assert decoder.generate([prompt], max_new_tokens=12)[0] == reference(model, prompt, 12)
    again = FastDecoder(model)  # a second decoder reuses the fused matrices
    assert again.layers[0].qkv_w.data_ptr() == decoder.layers[0].qkv_w.data_ptr()


def test_n_samples_fork_one_prefill(llama):
    model, decoder = llama
    batch = prompts(2, 33)
    calls = []
    forward = decoder._forward
    decoder._forward = lambda ids: calls.append(len(ids)) or forward(ids)
    try:
        rows = decoder.generate(batch, n=4, max_new_tokens=16, greedy=False, temperature=1.0, seed=5)
    finally:
        decoder._forward = forward
    assert calls == [33, 26]  # one prefill per prompt, not per sample
    assert len(rows) == 8 and all(len(r) == 16 for r in rows)
    assert len({tuple(r) for r in rows[:4]}) > 1  # the samples of one prompt differ
    greedy = decoder.generate(batch, n=3, max_new_tokens=10)
    assert greedy[0] == greedy[1] == greedy[2] == reference(model, batch[0], 10)
    assert greedy[3] == reference(model, batch[1], 10)


def test_seeded_sampling_is_reproducible(llama):
    _, decoder = llama
    batch = prompts(1, 30)
    run = lambda seed, top_p=0.9: decoder.generate(batch, n=3, max_new_tokens=20, greedy=False,  # noqa: E731
                                                   temperature=0.8, top_p=top_p, seed=seed)
    assert run(11) == run(11)
    assert run(11) != run(12)
    assert run(11, 1.0) == run(11, 1.0)
    torch.manual_seed(3)
    a = decoder.generate(batch, max_new_tokens=10, greedy=False, temperature=1.0)
    torch.manual_seed(3)
    assert decoder.generate(batch, max_new_tokens=10, greedy=False, temperature=1.0) == a  # seed=None follows torch


def test_a_seeded_sample_is_a_prefix_of_the_same_sample_with_more_room(llama):
    # A row's draws depend on its own steps only: not on max_new_tokens, nor on the other rows' prompts.
    _, decoder = llama
    batch = prompts(3, 40)
    run = lambda new, rows=batch: decoder.generate(rows, n=2, max_new_tokens=new, greedy=False,  # noqa: E731
                                                   temperature=0.9, seed=7)
    short, long = run(8), run(24)
    assert all(b[:len(a)] == a[:len(b)] for a, b in zip(short, long)) and short != [r[:8] for r in run(24, batch[::-1])]
    alone = decoder.generate(batch[1:2], n=2, max_new_tokens=8, greedy=False, temperature=0.9, seed=[7])
    together = decoder.generate(batch, n=2, max_new_tokens=8, greedy=False, temperature=0.9, seed=[1, 7, 3])
    assert together[2:4] == alone  # a seed per prompt: its rows are what it draws alone


def test_a_compile_failure_in_the_first_step_falls_back_to_eager_kernels(llama):
    # torch.compile compiles lazily: its first run can fail outside graph capture (graphs off, or the prefill's
    # step). That must turn compile off and finish the call on eager kernels, not fail the user's call.
    model, reference = llama
    decoder = FastDecoder(model)
    want = reference.generate(prompts(1, 30), n=2, max_new_tokens=8, greedy=True)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: simulated compile failure")

    decoder.use_compile, decoder._fns = True, {**decoder._eager, "pre": broken}
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = decoder.generate(prompts(1, 30), n=2, max_new_tokens=8, greedy=True)
    assert got == want and not decoder.use_compile and "simulated" in decoder.compile_error


def test_sampling_follows_the_tempered_top_p_distribution():
    """The inverse CDF over a grid of uniforms reproduces transformers' temperature + top-p probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    temperature, top_p = 0.7, 0.8
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = warped.softmax(-1)[0]
    grid = 20000
    u = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    for mode, target in (("top_p", expected), ("sample", (logits / temperature).softmax(-1)[0])):
        picks = sample(logits.expand(grid, -1), u, mode, torch.tensor(temperature), torch.tensor(top_p))
        freq = torch.bincount(picks, minlength=50).float() / grid
        assert torch.allclose(freq, target, atol=2e-4), mode
    assert (expected[sample(logits.expand(grid, -1), u, "top_p", torch.tensor(temperature),
                            torch.tensor(top_p))] > 0).all()  # never a token top-p removed
    assert sample(logits, u[:1], "greedy", None, None).item() == logits.argmax().item()


def test_stop_ids_end_rows_like_generate(llama):
    model, decoder = llama
    batch = prompts(2, 30)
    free = [reference(model, p, 30) for p in batch]
    stop = free[0][6]  # a token the first row produces
    rows = decoder.generate(batch, max_new_tokens=30, stop_ids={stop}, pad_id=0)
    for prompt, row in zip(batch, rows):
        expected = reference(model, prompt, 30, eos_token_id=stop)
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert row[:cut] == expected[:cut]
        assert all(t == 0 for t in row[cut:])
    assert rows[0].index(stop) == free[0].index(stop)


def test_cancel_and_streaming_steps(llama):
    _, decoder = llama
    batch = prompts(1, 30)
    cancel = threading.Event()
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.tolist())
            if len(seen) == 5:
                cancel.set()

        def end(self):
            seen.append("end")

    rows = decoder.generate(batch, n=2, max_new_tokens=200, streamer=Streamer(), cancel=cancel)
    assert seen[0] == [batch[0]]  # the prompt first, as generate does
    assert seen[-1] == "end"
    assert 4 <= len(rows[0]) <= 6 and len(rows[0]) == len(rows[1])  # stopped within a step of the cancel
    assert [s for s in seen[1:-1]] == [[a, b] for a, b in zip(rows[0], rows[1])]


def test_windows_and_cache_growth(llama):
    """Crossing attention windows (256 positions) and growing the static cache keep the tokens exact."""
    model, decoder = llama
    prompt = prompts(1, 250)[0]
    assert decoder.generate([prompt], max_new_tokens=20)[0] == reference(model, prompt, 20)
    long = prompts(1, 500, seed=2)[0]
    assert decoder.generate([long], n=2, max_new_tokens=30)[0] == reference(model, long, 30)
    assert decoder.len_cap >= 530 and decoder.rows_cap >= 2
    with pytest.raises(FastPathUnavailable):
        decoder.generate([long], max_new_tokens=1000)  # past max_position_embeddings


def test_compiled_layers_trace_and_match():
    """torch.compile of the per-layer pieces (what CUDA uses) traces whole and gives the same tokens.
    On the CPU it compiles C++ kernels, so this is the slowest test here."""
    model = tiny("llama", num_hidden_layers=1)
    decoder = FastDecoder(model, compile=True)
    batch = prompts(2, 20)
    rows = decoder.generate(batch, max_new_tokens=8)
    assert decoder.compile_error is None
    assert rows == [reference(model, p, 8) for p in batch]


def test_unsupported_models_are_refused_with_the_reason():
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(FastPathUnavailable) as info:
        FastDecoder(gpt2)
    assert info.value.permanent


# --- through the engine, on the embedded model ------------------------------------------------------

@pytest.fixture(scope="module")
def plain_engine():
    """The embedded model through generate() on plain nn.Linear layers (an engine asked for the fast
    decoder keeps them; the CPU default packs them for oneDNN, which rounds differently)."""
    engine = TransformersEngine("smollm2-135m", fast=True, dtype="fp32")  # fp32: see conftest.fp32_engine
    engine.fast = None
    return engine


@pytest.fixture(scope="module")
def fast_engine(plain_engine):
    """The same engine with the fast decoder switched on (a shallow copy: same model and tokenizer)."""
    twin = copy.copy(plain_engine)
    twin.fast = FastDecoder(plain_engine.model)
    return twin


def test_engine_greedy_equals_generate(plain_engine, fast_engine):
    other = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    params = SamplingParams(max_new_tokens=24)
    plain = plain_engine.generate([Prompt.of(QUESTION), Prompt.of(other)], params)
    quick = fast_engine.generate([Prompt.of(QUESTION), Prompt.of(other)], params)
    for a, b in zip(plain, quick):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [(c.text, c.finish_reason, c.completion_tokens) for c in a] == \
            [(c.text, c.finish_reason, c.completion_tokens) for c in b]


def test_engine_stream_stop_strings_and_seeds(plain_engine, fast_engine):
    params = SamplingParams(max_new_tokens=24)
    [[whole]] = fast_engine.generate([Prompt.of(QUESTION)], params)
    deltas = list(fast_engine.stream(Prompt.of(QUESTION), params))
    assert "".join(d.text for d in deltas) == whole.text and len(deltas) > 3
    assert deltas[-1].completion.token_ids == whole.token_ids
    stop = whole.text[whole.text.index(" ", 3):][:3]  # a stop string the answer is known to contain
    stopped = SamplingParams(max_new_tokens=24, stop=(stop,))
    [[cut]] = fast_engine.generate([Prompt.of(QUESTION)], stopped)
    [[ref]] = plain_engine.generate([Prompt.of(QUESTION)], stopped)
    assert cut.text == ref.text == whole.text[:whole.text.index(stop)] and cut.finish_reason == "stop"
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, n=3, seed=4)
    first = fast_engine.generate([Prompt.of(QUESTION)], sampled)[0]
    assert [c.token_ids for c in first] == [c.token_ids for c in fast_engine.generate([Prompt.of(QUESTION)],
                                                                                       sampled)[0]]


def test_engine_seeded_samples_equal_the_decoding_loops(fast_engine):
    # the fast path and the CPU decoding loop read the same uniforms: the same seeded samples (fp32)
    loop_engine = TransformersEngine("smollm2-135m", dtype="fp32")
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, n=3, seed=4)
    assert [c.token_ids for c in fast_engine.generate([Prompt.of(QUESTION)], sampled)[0]] == \
        [c.token_ids for c in loop_engine.generate([Prompt.of(QUESTION)], sampled)[0]]


def test_the_fast_path_builds_no_generate_cache(fast_engine, monkeypatch):
    built = []
    monkeypatch.setattr(fast_engine.prefix_cache, "batch_for", lambda *a, **k: built.append(a) or None)
    fast_engine.generate([Prompt.of(QUESTION, prefix="Let me see.")], SamplingParams(max_new_tokens=4, n=4))
    assert built == []  # generate()'s padded cache, repeated n times, would only be thrown away


def test_engine_continuations_use_the_prefix_cache(plain_engine, fast_engine):
    """A prompt with a prefix (a continued chain) takes its KV from the engine's prefix cache, then the
    last prompt token goes through a decoding step: the tokens still equal generate's."""
    params = SamplingParams(max_new_tokens=16)
    prompt = Prompt.of(QUESTION, prefix="Let me add the tens first.")
    [[plain]] = plain_engine.generate([prompt], params)
    before = plain_engine.prefix_cache.reused_tokens
    [[quick]] = fast_engine.generate([prompt], params)
    assert quick.token_ids == plain.token_ids
    assert plain_engine.prefix_cache.reused_tokens > before


def test_engine_cancel_through_the_stream(fast_engine):
    cancel = threading.Event()
    pieces = []
    for delta in fast_engine.stream(Prompt.of(QUESTION), SamplingParams(max_new_tokens=400), cancel):
        pieces.append(delta)
        if len(pieces) == 3:
            cancel.set()
    final = pieces[-1].completion
    assert final.finish_reason in ("cancelled", "stop") and final.completion_tokens < 60


def test_engine_falls_back_to_generate_and_says_why(plain_engine, fast_engine):
    config = plain_engine.model.generation_config
    before = config.repetition_penalty
    config.repetition_penalty = 1.3  # generate applies it; the fast decoder does not, so it steps aside
    fast._warned.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            [[c]] = fast_engine.generate([Prompt.of(QUESTION)], SamplingParams(max_new_tokens=8))
    finally:
        config.repetition_penalty = before
    assert c.completion_tokens > 0
    assert any("repetition_penalty" in str(w.message) for w in caught)
    assert fast_engine.fast is not None  # only this call went to generate


def test_engine_fast_default_is_off_on_cpu(engine):
    assert engine.fast is None  # the default on CUDA only; fast=True asks for it on the CPU


def test_benchmark_cpu_mode():
    """benchmarks/gpu_decode.py --cpu: the GPU benchmark's code paths on a tiny model, with its checks."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decode.py"), "--cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "greedy outputs identical to generate" in run.stdout and run.stdout.rstrip().endswith("OK")
