"""The CPU decoding loop (engines/decode_loop.py): generate's tokens, minus the rows that have ended."""
from __future__ import annotations

from contextlib import contextmanager

from thinktime.types import Prompt, SamplingParams

QUESTIONS = ["What is 17 + 25?", "Name a prime.", "What is 3 * 4? Explain."]


@contextmanager
def loop(engine, on: bool):
    before = engine.decode_loop
    engine.decode_loop = on
    try:
        yield
    finally:
        engine.decode_loop = before


@contextmanager
def batch_sizes(engine):
    """Rows of each forward: the model's own, and the lean step's (engines/lean_step.py) where it serves."""
    seen: list[int] = []
    handle = engine.model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    lean = engine.lean_step
    if lean is not None:
        def counted(tokens, *args):
            seen.append(tokens.shape[0])
            return lean(tokens, *args)
        engine.lean_step = counted
    try:
        yield seen
    finally:
        handle.remove()
        engine.lean_step = lean


def test_the_cpu_engine_uses_the_loop(engine):
    assert engine.decode_loop


def test_greedy_tokens_equal_generate_over_a_padded_batch(engine):
    prompts = [Prompt.of([{"role": "user", "content": q}]) for q in QUESTIONS]  # three prompt lengths
    params = SamplingParams(max_new_tokens=40)
    with loop(engine, False):
        want = engine.generate(prompts, params)
    with loop(engine, True):
        got = engine.generate(prompts, params)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
    assert [[c.finish_reason for c in row] for row in got] == [[c.finish_reason for c in row] for row in want]


def test_finished_rows_leave_the_batch(engine):
    params = SamplingParams(max_new_tokens=40, n=3, temperature=0.8, seed=5)  # chains of 12, 19 and 40 tokens
    with loop(engine, True), batch_sizes(engine) as seen:
        [chains] = engine.generate([Prompt.of([{"role": "user", "content": QUESTIONS[0]}])], params)
    lengths = sorted(c.completion_tokens for c in chains)
    assert lengths[0] < lengths[-1], "the seed should give chains of different lengths"
    seen = seen[seen.index(3):]  # before: the prompt's one-row prefill (its KV cache is shared by the 3 rows)
    assert seen[-1] < 3  # it started with every row and ended with fewer
    assert seen == sorted(seen, reverse=True)
    # one forward per generated token of the longest chain but the first, which the prompt's one-row
    # prefill gives every row
    assert len(seen) == lengths[-1] - 1


def test_seeded_sampling_repeats_and_top_p_applies(engine):
    prompt = Prompt.of([{"role": "user", "content": QUESTIONS[1]}])
    params = SamplingParams(max_new_tokens=24, n=4, temperature=0.9, top_p=0.9, seed=11)
    first, again = engine.generate([prompt], params)[0], engine.generate([prompt], params)[0]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    other = engine.generate([prompt], SamplingParams(max_new_tokens=24, n=4, temperature=0.9, top_p=0.9, seed=12))[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_a_seed_per_prompt_draws_what_each_prompt_alone_would(fp32_engine):
    # An eval seeds each problem; its samples must not depend on which problems share its call. fp32, so
    # that batching does not move the logits (in bf16 a padded batch rounds differently).
    prompts = [Prompt.of([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=12, n=2, temperature=0.9, seeds=(101, 202, 303))
    together = fp32_engine.generate(prompts, params)
    for prompt, seed, got in zip(prompts, params.seeds, together):
        [alone] = fp32_engine.generate([prompt], SamplingParams(max_new_tokens=12, n=2, temperature=0.9, seed=seed))
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    last_two = fp32_engine.generate(prompts[1:], params.for_prompts(1, 3))  # another batch: the same samples
    assert [[c.token_ids for c in row] for row in last_two] == [[c.token_ids for c in row] for row in together[1:]]


def test_chinese_and_emoji_stop_strings_stop_the_row(engine):
    # A Chinese character or an emoji can take a token per byte: the stop window counts bytes.
    from thinktime.engines.decode_rows import Rows

    for text, stop in (("我们算一下，所以答案是42。", "所以答案是"), ("ok 🦜🦜🦜 then", "🦜🦜🦜")):
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        rows = Rows(1, set(), 0, (stop,), engine.tokenizer, None)
        for token in ids:
            if rows.all_done:
                break
            rows.push([token])
        assert rows.all_done and stop in engine.tokenizer.decode(rows.ids[0]), (text, len(ids), rows.window)
        assert len(rows.ids[0]) < len(ids)  # it stopped there, not at the end


def test_generates_stop_strings_ignore_the_prompt(engine):
    # generate()'s fallback: a prompt ending in "\n" and a first token "\n" do not make "\n\n"
    import torch

    from thinktime.engines.hf_streaming import StopStrings

    prompt = engine.tokenizer("Step one.\n", add_special_tokens=False).input_ids
    newline = engine.tokenizer("\n", add_special_tokens=False).input_ids
    criterion = StopStrings(("\n\n",), engine.tokenizer, len(prompt))
    assert not criterion(torch.tensor([prompt + newline]), None).item()
    assert criterion(torch.tensor([prompt + newline + newline]), None).item()


def test_chunks_of_one_call_draw_afresh(engine):
    # more prompts than fit one batch: each chunk must not repeat the first chunk's draws
    before = engine.max_batch_rows
    engine.max_batch_rows = 2
    try:
        rows = engine.generate([Prompt.of([{"role": "user", "content": QUESTIONS[1]}])] * 3,
                               SamplingParams(max_new_tokens=8, n=2, temperature=1.0, seed=3))
    finally:
        engine.max_batch_rows = before
    assert len({tuple(tuple(c.token_ids) for c in row) for row in rows}) == 3


def test_a_cancel_before_the_call_prefills_nothing(engine):
    import threading

    cancel = threading.Event()
    cancel.set()
    with batch_sizes(engine) as seen:
        [[completion]] = engine.generate([Prompt.of([{"role": "user", "content": QUESTIONS[0]}])],
                                         SamplingParams(max_new_tokens=8), cancel)
    assert seen == [] and completion.finish_reason == "cancelled" and completion.completion_tokens == 0


def test_stream_joins_to_the_generated_text(engine):
    prompt, params = Prompt.of([{"role": "user", "content": QUESTIONS[2]}]), SamplingParams(max_new_tokens=32)
    [[whole]] = engine.generate([prompt], params)
    deltas = list(engine.stream(prompt, params))
    assert "".join(d.text for d in deltas) == whole.text and deltas[-1].completion.token_ids == whole.token_ids


def test_top_p_among_candidates_picks_what_the_full_sort_picks(monkeypatch):
    import torch

    from thinktime.engines import decode_ops

    used = {"candidates": 0, "too_few": 0}
    among = decode_ops._top_p_among_candidates

    def counted(*args):
        picked = among(*args)
        used["candidates" if picked is not None else "too_few"] += 1
        return picked

    monkeypatch.setattr(decode_ops, "_top_p_among_candidates", counted)
    generator = torch.Generator().manual_seed(0)
    for trial in range(24):
        logits = torch.randn(8, 4096, generator=generator) * (0.5 + trial % 6)  # flat to peaked
        u = 1 - torch.rand(8, generator=generator)
        for top_p in (0.5, 0.9, 0.95):
            want = decode_ops.sample(logits, u, "top_p", 0.8, top_p)
            assert torch.equal(decode_ops.sample(logits, u, "top_p", 0.8, top_p, candidates=64), want)
    assert used["candidates"] > 0 and used["too_few"] > 0  # both ways were taken
