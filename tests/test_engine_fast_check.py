"""The fast decoder's first-use check (thinktime/engines/fast_check.py) through the engine's own fast path, on
the CPU: a faithful decoder passes, a decoder whose output is made to part from generate's is caught, and
the near-tie rule is judged on real score tensors. The test double changes the decoder's tokens only; the
check's generate and its comparison are the production ones."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from thinktime.engines import fast_check
from thinktime.engines.fast import FastDecoder
from thinktime.engines.hf import TransformersEngine
from thinktime.types import Prompt, SamplingParams

QUESTION = Prompt.of([{"role": "user", "content": "What is 12 + 30?"}])
PARAMS = SamplingParams(max_new_tokens=20)


@pytest.fixture(scope="module")
def loaded():
    """The embedded model in fp32 with the fast decoder asked for (fp32: its tokens equal generate's exactly)."""
    engine = TransformersEngine("smollm2-135m", fast=True, dtype="fp32")
    plain = copy.copy(engine)  # the same model through generate(), for the expected tokens
    plain.fast = None
    [[expected]] = plain.generate([QUESTION], PARAMS)
    return engine, expected.token_ids


def fresh(engine, diverge_at: int | None = None):
    """A twin of the engine (same model and tokenizer) on its first fast-path call, and a list of the
    decoder's calls; with diverge_at, the decoder's rows get a wrong token at that position."""
    twin = copy.copy(engine)
    twin.fast, twin.fast_check = FastDecoder(engine.model), None
    calls = []
    decode = twin.fast.generate

    def spied(prompts, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        rows = decode(prompts, **kwargs)
        if diverge_at is not None:
            rows = [row[:diverge_at] + [(row[diverge_at] + 1) % 1000] + row[diverge_at + 1:]
                    if len(row) > diverge_at else row for row in rows]
        return rows

    twin.fast.generate = spied
    return twin, calls


def test_a_faithful_decoder_passes_once(loaded, monkeypatch):
    monkeypatch.delenv("THINKTIME_FAST", raising=False)
    engine, expected = loaded
    twin, calls = fresh(engine)
    [[first]] = twin.generate([QUESTION], PARAMS)
    assert twin.fast_check == "passed" and twin.fast is not None
    assert first.token_ids == expected
    assert calls == [fast_check.CHECK_TOKENS, PARAMS.max_new_tokens]  # the check, then the call itself
    [[again]] = twin.generate([QUESTION], PARAMS)
    assert again.token_ids == expected and calls[2:] == [PARAMS.max_new_tokens]  # checked once


def test_a_diverging_decoder_is_caught_and_generate_serves(loaded, monkeypatch):
    monkeypatch.delenv("THINKTIME_FAST", raising=False)
    engine, expected = loaded
    twin, calls = fresh(engine, diverge_at=5)
    with pytest.warns(RuntimeWarning, match="position 5 of 16") as caught:
        [[first]] = twin.generate([QUESTION], PARAMS)
    assert len([w for w in caught if "fast decoding" in str(w.message)]) == 1
    assert twin.fast is None and twin.fast_check == "failed at position 5"
    assert first.token_ids == expected  # this call was decoded again by generate: its tokens are right
    assert calls == [fast_check.CHECK_TOKENS]  # the wrong decoder never served the call
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        [[second]] = twin.generate([QUESTION], PARAMS)
    assert second.token_ids == expected and not [w for w in later if "fast decoding" in str(w.message)]
    assert calls == [fast_check.CHECK_TOKENS]


def test_verified_skips_the_check(loaded, monkeypatch):
    monkeypatch.setenv("THINKTIME_FAST", "verified")
    engine, _ = loaded
    twin, calls = fresh(engine, diverge_at=5)  # a check would catch it: it does not run
    twin.generate([QUESTION], PARAMS)
    assert twin.fast_check == "skipped (THINKTIME_FAST=verified)" and twin.fast is not None
    assert calls == [PARAMS.max_new_tokens]


def scores_with(top: float, runner_up: float, at: int = 3, steps: int = 6, vocab: int = 50) -> list[torch.Tensor]:
    """generate-like scores, one [vocab] row per step: token 7 leads at every step; at `at`, token 9 follows it
    at `runner_up`, the rest far below."""
    rows = []
    for i in range(steps):
        row = torch.full((vocab,), -10.0)
        row[7] = top
        row[9] = runner_up if i == at else top - 8
        rows.append(row)
    return rows


def test_the_near_tie_rule():
    reference = [7] * 6
    parted = [7, 7, 7, 9, 4, 4]  # took the runner-up at position 3, then went its own way
    step = fast_check.bf16_step(20.0)
    assert step == 0.125  # 20 lies in [16, 32): bf16 keeps 8 significant bits
    tie = fast_check.parting(reference, parted, scores_with(20.0, 20.0 - 2 * step))
    assert tie is not None and tie.at == 3 and (tie.expected, tie.got) == (7, 9)
    assert math.isclose(tie.steps, 2.0) and tie.near_tie
    wide = fast_check.parting(reference, parted, scores_with(20.0, 20.0 - 8 * step))
    assert wide.at == 3 and math.isclose(wide.steps, 8.0) and not wide.near_tie
    # a tie between generate's top two does not excuse a third token, far below both
    other = fast_check.parting(reference, [7, 7, 7, 30, 4, 4], scores_with(20.0, 20.0 - step))
    assert other.got == 30 and not other.near_tie
    assert fast_check.parting(reference, list(reference), scores_with(20.0, 19.0)) is None
    short = fast_check.parting(reference, reference[:4], scores_with(20.0, 19.0))
    assert short.at == 4 and short.got is None and not short.near_tie
