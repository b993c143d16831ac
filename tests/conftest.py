"""Shared fixtures: the real embedded model, loaded once per test session through the real loader."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("THINKTIME_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
