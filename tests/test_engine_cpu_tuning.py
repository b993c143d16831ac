"""The CPU kernels chosen by timing them on this machine (engines/cpu_tuning.py), on the real embedded model.

What wins is the machine's business: these tests check where the verdict comes from (a measurement, the
cache, the env), that the engine runs what it says, and that it decodes plain generate's greedy tokens.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from thinktime import models
from thinktime.engines import cpu_tuning
from thinktime.engines.hf import TransformersEngine
from thinktime.engines.onednn import cpu_has_bf16
from thinktime.types import Prompt, SamplingParams

MODEL = "smollm2-135m"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """THINKTIME_HOME in tmp_path (its models/ the real one), tuning on, and a short timing: what it picks is
    not under test."""
    (tmp_path / "models").symlink_to(models.models_dir(), target_is_directory=True)
    monkeypatch.setenv("THINKTIME_HOME", str(tmp_path))
    monkeypatch.setenv("THINKTIME_CPU_TUNING", "1")
    for name in ("THINKTIME_ONEDNN", "THINKTIME_LEAN_STEP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("STEPS", 1), ("PROMPT_TOKENS", 32), ("BUDGET_S", 1.0), ("BUSY", float("inf"))):
        monkeypatch.setattr(cpu_tuning, name, value)
    return tmp_path


def _cache_file(home) -> dict:
    return json.loads((home / cpu_tuning.CACHE_FILE).read_text())["verdicts"]


def _no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("timed again")  # not an Exception: the engine's fallback to the defaults does not catch it
    monkeypatch.setattr(cpu_tuning, "measure", refuse)


def _runs_its_verdict(engine) -> None:
    kernels = engine.cpu_kernels
    assert engine.dtype == cpu_tuning.DTYPES[kernels["dtype"]] == engine.model.dtype
    assert (engine.packed_linears > 0) == kernels["onednn"]
    assert engine.cpu_decode_attention == (kernels["decode_attention"] or kernels["shared_prefix"])
    assert engine.shared_prefix_decoding == kernels["shared_prefix"]
    assert (engine.lean_step is not None) == (kernels["shared_prefix"] and kernels["lean_step"])  # SmolLM2: a Llama


def test_the_verdict_is_measured_once_then_read_from_the_cache(home, monkeypatch):
    first = TransformersEngine(MODEL)
    assert first.cpu_kernels["source"] == "measured" and first.cpu_kernels["forced"] == []
    _runs_its_verdict(first)
    [(key, saved)] = _cache_file(home).items()
    assert cpu_tuning.cpu_name() in key and torch.__version__ in key and "hidden_size 576" in key
    assert {piece: saved[piece] for piece in ("dtype", *cpu_tuning.PIECES)} == \
        {piece: first.cpu_kernels[piece] for piece in ("dtype", *cpu_tuning.PIECES)}
    assert saved["ms"][0]  # the timings it chose by are kept beside the choice

    with monkeypatch.context() as patched:
        _no_measuring(patched)
        second = TransformersEngine(MODEL)
    assert second.cpu_kernels["source"] == "cached"
    assert {k: second.cpu_kernels[k] for k in saved} == saved
    _runs_its_verdict(second)

    # another CPU, or another torch: nothing cached for it, so it would be measured
    def lookup():
        return cpu_tuning.Tuning(second.model.config, None, torch.bfloat16, fp32_fits=True).verdict

    assert lookup()["source"] == "cached"
    with monkeypatch.context() as patched:
        patched.setattr(cpu_tuning, "cpu_name", lambda: "Intel(R) Xeon(R) Test CPU AVX512 avx2 avx512f")
        assert lookup() is None
    with monkeypatch.context() as patched:
        patched.setattr(torch, "__version__", torch.__version__ + ".other")
        assert lookup() is None


def test_the_key_names_the_cpu_the_torch_version_and_the_model_shape(monkeypatch):
    config = AutoConfig.from_pretrained(models.resolve(MODEL).path)
    key = cpu_tuning.cache_key(config, {})
    monkeypatch.setattr(cpu_tuning, "cpu_name", lambda: "Other CPU")
    other_cpu = cpu_tuning.cache_key(config, {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    other_torch = cpu_tuning.cache_key(config, {})
    config.num_hidden_layers += 1
    other_model = cpu_tuning.cache_key(config, {})
    assert len({key, other_cpu, other_torch, other_model}) == 4
    assert cpu_tuning.cache_key(config, {"onednn": False}) != other_model  # a forced piece is another question


def test_env_flags_and_an_explicit_dtype_are_obeyed(home, monkeypatch):
    monkeypatch.setenv("THINKTIME_ONEDNN", "0")
    monkeypatch.setenv("THINKTIME_LEAN_STEP", "0")
    engine = TransformersEngine(MODEL, dtype="fp32")
    kernels = engine.cpu_kernels
    assert kernels["source"] == "measured" and kernels["forced"] == ["dtype", "lean_step", "onednn"]
    assert kernels["dtype"] == "fp32" and not kernels["onednn"] and not kernels["lean_step"]
    assert engine.packed_linears == 0 and engine.lean_step is None and engine.dtype == torch.float32
    assert all(ms.split()[0] == "fp32" and "onednn" not in ms for race in kernels["ms"] for ms in race)

    monkeypatch.setenv("THINKTIME_CPU_TUNING", "0")  # no timing: the hand-tuned defaults, as before it
    _no_measuring(monkeypatch)
    monkeypatch.delenv("THINKTIME_ONEDNN")
    defaults = TransformersEngine(MODEL)
    assert defaults.cpu_kernels["source"] == "env"
    assert all(defaults.cpu_kernels[piece] for piece in cpu_tuning.PIECES if piece != "lean_step")
    assert defaults.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert defaults.packed_linears and defaults.shared_prefix_decoding and defaults.lean_step is None  # still LEAN=0


def test_a_corrupt_cache_file_is_ignored_and_rewritten(home):
    config = AutoConfig.from_pretrained(models.resolve(MODEL).path)
    key = cpu_tuning.cache_key(config, {"dtype": "fp32"})
    path = home / cpu_tuning.CACHE_FILE
    for garbage in ("{not json", '["a list"]', '{"verdicts": 3}', '{"verdicts": {"KEY": {"dtype": "fp64"}}}',
                    '{"verdicts": {"KEY": {"dtype": "fp32", "onednn": "yes"}}}'):
        path.write_text(garbage.replace("KEY", key))
        assert cpu_tuning.cached(key, {}) is None, garbage
    path.write_text("\0\0 half a write")
    engine = TransformersEngine(MODEL, dtype="fp32")
    assert engine.cpu_kernels["source"] == "measured"
    assert list(_cache_file(home)) == [key] and _cache_file(home)[key]["dtype"] == "fp32"


def test_a_timing_on_a_busy_cpu_is_used_but_not_kept(home, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "BUSY", -1.0)  # as if other processes had had the CPUs
    engine = TransformersEngine(MODEL, dtype="fp32")
    assert engine.cpu_kernels["source"] == "measured"
    _runs_its_verdict(engine)
    assert not (home / cpu_tuning.CACHE_FILE).exists()


CASES = (("What is 17 + 25?", 1), ("What is 7 * 6?", 2))  # n=2: the shared-prefix path where it is on
TOKENS = 20


@pytest.fixture(scope="module")
def plain_fp32():
    """Plain transformers in fp32 and, filled by the first test that asks, its greedy tokens for CASES."""
    model = AutoModelForCausalLM.from_pretrained(models.resolve(MODEL).path, dtype=torch.float32).eval()
    return model, {}


def _plain_generate_tokens(plain, engine, prompt: Prompt, n: int) -> list[list[int]]:
    ids = engine.tokenizer(engine.render(prompt), return_tensors="pt", add_special_tokens=False).input_ids.repeat(n, 1)
    with torch.inference_mode():
        out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                             eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.tokenizer.pad_token_id)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:next((i for i, t in enumerate(row) if t in engine.stop_ids), len(row))] for row in rows]


def _decodes_like_plain_generate(engine, plain_fp32) -> None:
    plain, want = plain_fp32
    for question, n in CASES:
        prompt = Prompt.of([{"role": "user", "content": question}])
        if (question, n) not in want:
            want[question, n] = _plain_generate_tokens(plain, engine, prompt, n)
        [chains] = engine.generate([prompt], SamplingParams(max_new_tokens=TOKENS, n=n))
        assert [c.token_ids for c in chains] == want[question, n], question


def test_the_chosen_kernels_decode_plain_generates_greedy_tokens(home, plain_fp32):
    engine = TransformersEngine(MODEL, dtype="fp32")
    _runs_its_verdict(engine)
    _decodes_like_plain_generate(engine, plain_fp32)


OFF = dict.fromkeys(cpu_tuning.PIECES, False)


@pytest.mark.parametrize("pieces", [{}, {"onednn": True}, {"decode_attention": True}, {"shared_prefix": True},
                                    {"shared_prefix": True, "lean_step": True}],
                         ids=["none", "onednn", "decode_attention", "shared_prefix", "shared_prefix+lean"])
def test_every_verdict_decodes_plain_generates_greedy_tokens(home, monkeypatch, plain_fp32, pieces):
    """Whatever a machine picks: each piece alone on the plain setting, from the cache (all of them together are
    the defaults the other engine tests run)."""
    config = plain_fp32[0].config
    cpu_tuning.write_cache(cpu_tuning.cache_key(config, {"dtype": "fp32"}), {"dtype": "fp32", **OFF, **pieces})
    _no_measuring(monkeypatch)
    engine = TransformersEngine(MODEL, dtype="fp32")
    assert engine.cpu_kernels["source"] == "cached"
    _runs_its_verdict(engine)
    _decodes_like_plain_generate(engine, plain_fp32)


def test_the_pick_keeps_the_plain_setting_unless_a_piece_clearly_wins():
    plain, packed = cpu_tuning.Setting("fp32"), cpu_tuning.Setting("fp32", onednn=True)
    bf16 = cpu_tuning.Setting("bf16", onednn=True)
    assert cpu_tuning._pick({plain: (0.010, 0.020), packed: (0.0099, 0.0199)}, plain) == plain  # within the margin
    assert cpu_tuning._pick({plain: (0.010, 0.020), packed: (0.008, 0.012), bf16: (0.006, 0.010)}, plain) == bf16
    assert cpu_tuning._pick({plain: None, packed: (0.010, 0.020)}, plain) == packed  # plain could not run
    # 4x faster at 8 rows but 20% slower for one chain: it loses, and a piece that loses is not used
    assert cpu_tuning._pick({plain: (0.010, 0.020), packed: (0.012, 0.005)}, plain) == plain
    assert cpu_tuning._pick({plain: (0.010, 0.020), packed: (0.012, 0.005), bf16: (0.0095, 0.015)}, plain) == bf16


def test_a_cast_model_is_the_model_loaded_in_that_dtype():
    path = models.resolve(MODEL).path
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    cast = cpu_tuning.cast_parameters(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), torch.bfloat16)
    ids = torch.tensor([[1, 504, 3658, 314, 1789, 2117, 28, 3001, 30, 216]])
    with torch.inference_mode():
        assert torch.equal(cast(ids).logits, loaded(ids).logits)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
