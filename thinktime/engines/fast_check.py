"""Whether the fast decoder's greedy tokens are `generate`'s: the rule that benchmarks/gpu_decode.py and the
engine's first-use check (fast.run_for_engine) share.

Two greedy decoders of one bf16 model may part where two logits tie within rounding: a different summation
order rounds them the other way. So a parting is judged by `generate`'s own scores at the first position
where the tokens differ: the gap between its score for its own token and for the fast decoder's (its top-2
gap when the decoder took the runner-up), counted in bf16 rounding steps at the top score's scale. Within
NEAR_TIE_STEPS it is a near-tie; beyond, a bug.

On first use on a model (a process, an engine) the engine decodes CHECK_TOKENS greedy tokens of the call's
first prompt both ways; a parting that is not a near-tie turns the fast decoder off for that engine, with a
warning. THINKTIME_FAST=verified skips the check (for a machine where the benchmark has been run).

Needs only torch: the benchmark loads it by path where thinktime's other dependencies are not installed.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

# Two logits closer than this many bf16 rounding steps (at the top logit's scale) are a tie that rounding may
# break either way: greedy outputs that part there are not a bug.
NEAR_TIE_STEPS = 4
CHECK_TOKENS = 16  # new tokens of the first-use check (against the 8,192 of a default GPU chain)


def bf16_step(x: float) -> float:
    """The gap between adjacent bf16 numbers around x (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass(frozen=True)
class Parting:
    """Where a decoder's greedy tokens first differ from `generate`'s, and how far apart `generate` saw them."""

    at: int  # the position among the new tokens, from 0
    expected: int | None  # generate's token there (None: its row ended first)
    got: int | None  # the decoder's
    gap: float  # generate's score of its token minus its score of the decoder's (inf where one is missing)
    steps: float  # the gap in bf16 rounding steps at generate's top score

    @property
    def near_tie(self) -> bool:
        return self.steps <= NEAR_TIE_STEPS


def parting(reference: list[int], tokens: list[int], scores) -> Parting | None:
    """None where `tokens` equal `generate`'s greedy `reference`; else the first parting, judged by `scores`
    (generate's output_scores for this row: one [vocab] tensor per new token)."""
    at = first_difference(reference, tokens)
    if at is None:
        return None
    expected = reference[at] if at < len(reference) else None
    got = tokens[at] if at < len(tokens) else None
    if expected is None or got is None or at >= len(scores):
        return Parting(at, expected, got, math.inf, math.inf)
    row = scores[at].float()
    best = float(row[expected])
    gap = best - float(row[got])
    return Parting(at, expected, got, gap, gap / bf16_step(best))


def compare_with_generate(model, decoder, prompt: list[int], tokens: int = CHECK_TOKENS,
                          pad_id: int = 0) -> Parting | None:
    """`tokens` greedy new tokens of `prompt` from the fast decoder and from `model.generate` (no stop ids:
    always that many), compared by `parting`."""
    got = decoder.generate([list(prompt)], max_new_tokens=tokens, greedy=True, seed=0, stop_ids=(),
                           pad_id=pad_id)[0]
    with torch.inference_mode():
        ids = torch.tensor([list(prompt)], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None,
                             pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True)
    reference = out.sequences[0, ids.shape[1]:].tolist()
    return parting(reference, got, [step[0] for step in out.scores])


def verified() -> bool:
    return os.environ.get("THINKTIME_FAST", "").strip().lower() == "verified"


def first_use(engine, decoder, prompt: list[int], max_new: int) -> bool:
    """The engine's first-use check (once per engine, on its first fast-path call): whether the fast decoder
    may serve calls. The outcome goes to engine.fast_check; a parting beyond a near-tie warns and sets
    engine.fast to None, so this call and every later one go to generate."""
    if verified():
        engine.fast_check = "skipped (THINKTIME_FAST=verified)"
        return True
    tokens = min(CHECK_TOKENS, max_new)
    if tokens < 1:
        return True  # nothing to compare yet: the next call checks
    found = compare_with_generate(engine.model, decoder, prompt, tokens, engine.tokenizer.pad_token_id)
    if found is None:
        engine.fast_check = "passed"
        return True
    if found.near_tie:
        engine.fast_check = f"passed (a bf16 near-tie at position {found.at})"
        return True
    engine.fast_check = f"failed at position {found.at}"
    engine.fast = None
    warnings.warn(
        f"thinktime fast decoding turned off for {getattr(engine, 'model_name', 'this model')}: its greedy tokens "
        f"part from generate's at position {found.at} of {tokens} (from 0): fast decoder {found.got}, generate "
        f"{found.expected}, {found.steps:.1f} bf16 steps apart in generate's scores (a near-tie is at most "
        f"{NEAR_TIE_STEPS}); using generate. Please report it with the output of benchmarks/gpu_decode.py",
        RuntimeWarning, stacklevel=4)
    return False
