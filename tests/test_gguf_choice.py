"""The embedded GGUF's type chosen, where asked, by timing each candidate on this machine (engines/gguf_choice.py).

Which type wins is the machine's business: these tests check that every candidate is written and timed, that
the verdict is kept and read back, that the engine runs the file it names, and that a bad setting is refused
before anything loads.
"""
from __future__ import annotations

import json

import pytest

from thinktime import models
from thinktime.engines import gguf_choice
from thinktime.errors import BadInputError
from thinktime.types import Prompt, SamplingParams

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")
from thinktime.engines.llamacpp import LlamaCppEngine  # noqa: E402

PROMPT = Prompt.of([{"role": "user", "content": "What is 2 plus 3?"}])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One THINKTIME_HOME for the module (the written types are reused), its models/ the real one."""
    path = tmp_path_factory.mktemp("home")
    (path / "models").symlink_to(models.models_dir(), target_is_directory=True)
    return path


@pytest.fixture
def timing(home, monkeypatch):
    monkeypatch.setenv("THINKTIME_HOME", str(home))
    monkeypatch.setenv("THINKTIME_GGUF_TYPE", "auto")
    monkeypatch.setattr(gguf_choice, "BUSY", float("inf"))  # a busy CI machine still keeps its verdict here
    return home


def _answer(engine) -> str:
    return engine.generate([PROMPT], SamplingParams(max_new_tokens=8))[0][0].text


def test_each_type_is_timed_and_the_verdict_is_kept(timing):
    (timing / gguf_choice.CACHE_FILE).unlink(missing_ok=True)
    engine = LlamaCppEngine("smollm2-135m")
    try:
        verdict = engine.gguf_type
        assert verdict["source"] == "timed"
        assert set(verdict["figures"]) == {"shipped", *gguf_choice.FTYPES}
        assert all(value > 0 for figures in verdict["figures"].values() for value in figures.values())
        assert verdict["type"] == gguf_choice.pick(verdict["figures"])
        expected = models.embedded_gguf() if verdict["type"] == "shipped" else \
            timing / "gguf-types" / f"{models.embedded_gguf().stem}.{verdict['type']}.gguf"
        assert engine.path == expected
        assert _answer(engine).strip()
    finally:
        engine.close()
    kept = json.loads((timing / gguf_choice.CACHE_FILE).read_text())["verdicts"]
    assert [entry["type"] for entry in kept.values()] == [verdict["type"]]
    again = LlamaCppEngine("smollm2-135m")
    try:
        assert again.gguf_type["source"] == "cached" and again.path == expected
    finally:
        again.close()


@pytest.mark.parametrize("kind", sorted(gguf_choice.FTYPES))
def test_a_forced_type_is_written_and_run(timing, monkeypatch, kind):
    monkeypatch.setenv("THINKTIME_GGUF_TYPE", kind.lower())
    engine = LlamaCppEngine("smollm2-135m")
    try:
        assert engine.gguf_type == {"type": kind, "source": "THINKTIME_GGUF_TYPE"}
        assert engine.dtype == kind  # an eval run's config records the weights type
        assert engine.path.name.endswith(f".{kind}.gguf") and engine.path.parent == timing / "gguf-types"
        assert _answer(engine).strip()
    finally:
        engine.close()
    assert not list((timing / "gguf-types").glob("*.partial"))


def test_the_shipped_file_runs_unless_asked(home, monkeypatch):
    monkeypatch.setenv("THINKTIME_HOME", str(home))
    monkeypatch.delenv("THINKTIME_GGUF_TYPE", raising=False)
    engine = LlamaCppEngine("smollm2-135m")
    try:
        assert engine.gguf_type == {"type": "shipped", "source": "default"}
        assert engine.path == models.embedded_gguf() and engine.dtype == ""
    finally:
        engine.close()


def test_a_gguf_named_by_path_keeps_its_own_type(timing, embedded_gguf_path):
    engine = LlamaCppEngine(str(embedded_gguf_path))
    try:
        assert engine.gguf_type is None and engine.path == embedded_gguf_path and engine.dtype == ""
    finally:
        engine.close()


def test_an_unknown_type_is_refused_before_loading(timing, monkeypatch):
    monkeypatch.setenv("THINKTIME_GGUF_TYPE", "Q3_K")
    with pytest.raises(BadInputError, match="THINKTIME_GGUF_TYPE='Q3_K'.*Q8_0"):
        LlamaCppEngine("smollm2-135m")


def test_the_type_that_runs_a_typical_job_fastest_wins_by_a_margin():
    shipped = {"prefill": 300.0, "1 row": 100.0, "8 rows": 200.0}
    figures = {"shipped": shipped,
               "Q8_0": {"prefill": 600.0, "1 row": 100.0, "8 rows": 240.0},
               "BF16": {"prefill": 900.0, "1 row": 70.0, "8 rows": 250.0}}
    assert gguf_choice.pick(figures) == "Q8_0"  # BF16 reads prompts fastest, but its slow single chain costs more
    figures["BF16"]["1 row"] = 100.0
    assert gguf_choice.pick(figures) == "BF16"
    figures = {"shipped": shipped, **{kind: {k: v * 1.02 for k, v in shipped.items()} for kind in gguf_choice.FTYPES}}
    assert gguf_choice.pick(figures) == "shipped"  # within the noise
