"""The transformers engine reuses the KV cache of a continued prompt instead of prefilling it again."""
from __future__ import annotations

from contextlib import contextmanager

from thinktime.types import Prompt, SamplingParams

MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]


@contextmanager
def no_reuse(engine):
    engine.prefix_cache.enabled = False
    try:
        yield
    finally:
        engine.prefix_cache.enabled = True


def test_a_growing_prefix_is_prefilled_only_once(engine):
    engine.prefix_cache.clear()
    before = engine.prefix_cache.computed_tokens
    first = Prompt.of(MESSAGES, prefix="Let me add.\n\n")
    step = engine.generate([first], SamplingParams(max_new_tokens=8))[0][0]
    computed = engine.prefix_cache.computed_tokens
    # Everything but the last prompt token; or on the CPU path all of it, as its logits give the first token.
    assert computed - before == step.prompt_tokens - (0 if engine.shared_prefix_decoding else 1)
    second = Prompt.of(MESSAGES, prefix=first.prefix + step.text + "\n\n")
    again = engine.generate([second], SamplingParams(max_new_tokens=8))[0][0]
    new_tokens = engine.prefix_cache.computed_tokens - computed
    # only the step and the delimiter were prefilled (a few tokens of slack for re-tokenisation)
    assert new_tokens <= again.prompt_tokens - step.prompt_tokens + 3
    assert engine.prefix_cache.reused_tokens >= step.prompt_tokens - 4


def test_reuse_gives_the_same_continuations(fp32_engine):
    engine = fp32_engine
    prompts = [Prompt.of(MESSAGES, prefix="First,"), Prompt.of([{"role": "user", "content": "Name a colour."}],
                                                                prefix="Sure")]
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, n=2, seed=5)
    with no_reuse(engine):
        expected = [engine.generate(prompts, greedy), engine.generate(prompts, sampled)]
    engine.generate(prompts, greedy)  # fill the cache
    got = [engine.generate(prompts, greedy), engine.generate(prompts, sampled)]
    for want, have in zip(expected, got):
        assert [[c.token_ids for c in row] for row in want] == [[c.token_ids for c in row] for row in have]
        assert [[c.completion_tokens for c in row] for row in want] == [[c.completion_tokens for c in row]
                                                                         for row in have]
    streamed = "".join(d.text for d in engine.stream(prompts[0], greedy))
    assert streamed == expected[0][0][0].text


def test_a_single_fresh_chain_does_not_touch_the_cache(engine):
    engine.prefix_cache.clear()
    engine.generate([Prompt.of(MESSAGES)], SamplingParams(max_new_tokens=6))
    assert not engine.prefix_cache.entries


def test_n_samples_share_one_prefill_and_greedy_n_works(engine):
    engine.prefix_cache.clear()
    before = engine.prefix_cache.computed_tokens
    rows = engine.generate([Prompt.of(MESSAGES)], SamplingParams(max_new_tokens=6, n=4))[0]
    # The prompt was prefilled once for all four rows, not four times.
    assert engine.prefix_cache.computed_tokens - before == rows[0].prompt_tokens - (
        0 if engine.shared_prefix_decoding else 1)
    assert len({tuple(r.token_ids) for r in rows}) == 1  # greedy n > 1: n equal chains, not an error


def test_a_batch_of_questions_prefills_the_shared_system_prompt_once(engine):
    engine.prefix_cache.clear()
    system = {"role": "system", "content": "You are a careful assistant. Think step by step, then answer. " * 4}
    prompts = [Prompt.of([system, {"role": "user", "content": q}]) for q in ("What is 2 + 2?", "Name a colour.",
                                                                              "What is 7 * 6?")]
    before = engine.prefix_cache.computed_tokens
    rows = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    lengths = [r[0].prompt_tokens for r in rows]
    computed = engine.prefix_cache.computed_tokens - before
    # the system prompt (over 50 tokens) once, then each question's own tokens, not every prompt in full
    assert computed <= sum(length - 1 for length in lengths) - 2 * 50
    assert len(engine.prefix_cache.entries) == 1  # only the shared start is kept, not each fresh question
    with no_reuse(engine):
        alone = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [r[0].text for r in rows] == [r[0].text for r in alone]


def test_prefill_keeps_the_logits_after_the_prompt(engine):
    import torch

    engine.prefix_cache.clear()
    ids = engine.tokenizer("What is 2 + 2? Think first.").input_ids
    with torch.inference_mode():
        cache, logits = engine.prefix_cache.prefill_with_logits(ids)
        again_cache, again = engine.prefix_cache.prefill_with_logits(ids)  # a hit: no forward, the kept logits
        want = engine.model(torch.tensor([ids])).logits[0, -1]
    assert again_cache is cache and torch.equal(again, logits)
    assert torch.allclose(logits.float(), want.float(), atol=1e-3 * want.abs().max().item())
    engine.prefix_cache.clear()
    assert not engine.prefix_cache.last_logits
