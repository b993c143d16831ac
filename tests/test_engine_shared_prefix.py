"""The shared-prefix KV cache (engines/shared_prefix.py): a prompt held once for all rows and read once per step.

Checked against what it replaces: the same model with an ordinary cache that holds the prompt in
every row (sdpa attention), step by step on logits, and through the engine on tokens.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from thinktime import models
from thinktime.engines import cpu_attention
from thinktime.engines.growing_cache import new_growing_cache
from thinktime.engines.shared_prefix import SharedPrefixLayer, one_query_attention, shared_prefix_cache
from thinktime.types import Prompt, SamplingParams

SYSTEM = {"role": "system", "content": "You are a careful assistant. Think step by step, then answer. " * 4}


def _load(dtype):
    return AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m").path, dtype=dtype).eval()


@contextmanager
def switched(engine, attribute: str, value):
    before = getattr(engine, attribute)
    setattr(engine, attribute, value)
    try:
        yield
    finally:
        setattr(engine, attribute, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_a_cache_that_holds_the_prompt_in_every_row(dtype):
    """Three rows after one 30-token prompt, each with its own (padded) tokens, then three decoding steps."""
    plain, shared = _load(dtype), _load(dtype)
    assert cpu_attention.use_for(shared)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 1000, (1, 30), generator=generator)
    own = torch.randint(5, 1000, (3, 6), generator=generator)
    own_mask = torch.ones_like(own)
    own_mask[0, :2] = 0  # a row with fewer own tokens, padded after the shared prompt
    ids = torch.cat([prompt.expand(3, -1), own], dim=1)
    mask = torch.cat([torch.ones(3, 30, dtype=own_mask.dtype), own_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    with torch.inference_mode():
        for model in (plain, shared):
            if model is plain:
                cache, start = new_growing_cache(model.config), 0
            else:
                prefix = DynamicCache(config=model.config)
                model(prompt, cache=prefix, use_cache=True)
                cache, start = shared_prefix_cache(prefix, model.config), 30
                assert all(type(layer) is SharedPrefixLayer for layer in cache.layers)
            logits = [model(ids[:, start:], attention_mask=mask, position_ids=positions[:, start:], cache=cache,
                            use_cache=True).logits[:, -1]]
            step_mask = mask
            for token in (100, 101, 102):
                step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                logits.append(model(torch.full((3, 1), token), attention_mask=step_mask,
                                    position_ids=step_mask.sum(-1, keepdim=True) - 1, cache=cache,
                                    use_cache=True).logits[:, -1])
            assert cache.get_seq_length() == 39
            results.append(torch.stack(logits))
    want, got = results
    tolerance = 1e-4 if dtype == torch.float32 else 0.05  # bf16: the products differ in rounding
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    if dtype == torch.float32:  # bf16 rounding can flip a near-tie of these random tokens
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_one_query_attention_equals_softmax_attention_over_the_whole_sequence():
    generator = torch.Generator().manual_seed(1)
    rows, heads, groups, dim, shared_length, own_length = 4, 6, 2, 8, 11, 5
    prefix_keys, prefix_values = (torch.randn(1, groups, shared_length, dim, generator=generator) for _ in range(2))
    layer = SharedPrefixLayer(prefix_keys, prefix_values)
    keys, values = layer.update(*(torch.randn(rows, groups, own_length, dim, generator=generator) for _ in range(2)))
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    own_mask = torch.ones(rows, 1, 1, own_length, dtype=torch.bool)
    own_mask[2, ..., :3] = False
    got = one_query_attention(layer, query, keys, values, own_mask, scale=0.3)
    whole_keys, whole_values = layer.expanded(keys, values)
    whole_mask = torch.cat([torch.ones(rows, 1, 1, shared_length, dtype=torch.bool), own_mask], dim=-1)
    expanded_keys = whole_keys.repeat_interleave(heads // groups, dim=1)
    expanded_values = whole_values.repeat_interleave(heads // groups, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(query, expanded_keys, expanded_values,
                                                            attn_mask=whole_mask, scale=0.3)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)
    layer.batch_select_indices(torch.tensor([0, 3]))  # finished rows leave; the shared part stays whole
    assert layer.keys.shape[0] == 2 and layer.prefix_keys.shape[0] == 1
    assert layer.get_seq_length() == shared_length + own_length


def test_n_samples_and_a_batch_of_questions_decode_the_same_tokens(fp32_engine):
    engine = fp32_engine
    assert engine.shared_prefix_decoding
    question = Prompt.of([SYSTEM, {"role": "user", "content": "What is 17 + 25?"}])
    batch = [Prompt.of([SYSTEM, {"role": "user", "content": q}]) for q in ("Name a colour.", "What is 7 * 6?")]
    cases = [([question], SamplingParams(max_new_tokens=24, n=4, temperature=0.8, seed=7)),
             ([question], SamplingParams(max_new_tokens=24, n=2)),
             (batch, SamplingParams(max_new_tokens=24))]
    for prompts, params in cases:
        with switched(engine, "shared_prefix_decoding", False):
            want = engine.generate(prompts, params)
        got = engine.generate(prompts, params)
        with switched(engine, "lean_step", None):  # the model's own forward for every step
            through_forward = engine.generate(prompts, params)
        assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
        assert [[c.token_ids for c in row] for row in through_forward] == [[c.token_ids for c in row] for row in want]


def _lean_and_forward_logits(engine):
    """Two decoding steps of three rows (one with a padded position) over a shared-prefix cache, through the
    model's forward and through the lean step: (forward's logits, lean step's logits)."""
    model, rows = engine.model, 3
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(5, 1000, (1, 25), generator=generator)
    results = []
    with torch.inference_mode():
        for lean in (False, True):
            prefix = DynamicCache(config=model.config)
            model(prompt, cache=prefix, use_cache=True)
            cache = shared_prefix_cache(prefix, model.config)
            mask = torch.ones(rows, 26, dtype=torch.long)
            mask[1, 25] = 0  # one row's own first position is padding
            tokens = torch.tensor([[7], [8], [9]])
            model(tokens, attention_mask=mask, position_ids=(mask.sum(-1, keepdim=True) - 1).clamp(min=0), cache=cache,
                  use_cache=True)
            logits = []
            for token in (100, 101):
                mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
                positions, tokens = mask.sum(-1, keepdim=True) - 1, torch.full((rows, 1), token)
                if lean:
                    own = mask[:, 25:].bool()[:, None, None, :]
                    logits.append(engine.lean_step(tokens, positions, cache, own))
                else:
                    logits.append(model(tokens, attention_mask=mask, position_ids=positions, cache=cache,
                                        use_cache=True).logits[:, -1])
            results.append(torch.stack(logits))
    return results


def test_the_lean_step_gives_the_model_forward_logits(engine):
    assert engine.lean_step is not None  # SmolLM2 is a Llama
    assert engine.packed_linears  # the lean step calls the packed, fused kernels
    through_forward, through_lean_step = _lean_and_forward_logits(engine)
    assert torch.equal(through_forward, through_lean_step)


def test_the_lean_step_without_onednn_gives_the_model_forward_logits(monkeypatch):
    """Plain nn.Linear projections (oneDNN off): the lean step calls each and puts q/k/v and gate/up side by side."""
    from thinktime.engines.hf import TransformersEngine

    monkeypatch.setenv("THINKTIME_ONEDNN", "0")
    engine = TransformersEngine("smollm2-135m", dtype="fp32")
    assert engine.packed_linears == 0 and engine.lean_step is not None
    through_forward, through_lean_step = _lean_and_forward_logits(engine)
    assert torch.equal(through_forward, through_lean_step)


def test_the_switch_keeps_the_model_forward(monkeypatch):
    from thinktime.engines.hf import TransformersEngine

    monkeypatch.setenv("THINKTIME_LEAN_STEP", "0")
    engine = TransformersEngine("smollm2-135m")
    assert engine.shared_prefix_decoding and engine.lean_step is None


def test_models_that_are_not_llama_shaped_keep_the_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    from thinktime.engines.lean_step import LeanStep

    assert LeanStep.unavailable_reason(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))) is not None


def test_the_next_question_reuses_the_system_prompt_of_the_last(engine):
    engine.prefix_cache.clear()
    params = SamplingParams(max_new_tokens=4, n=2, temperature=0.8, seed=1)
    first = engine.generate([Prompt.of([SYSTEM, {"role": "user", "content": "What is 2 + 2?"}])], params)[0][0]
    before = engine.prefix_cache.computed_tokens
    second = engine.generate([Prompt.of([SYSTEM, {"role": "user", "content": "What is 30 + 12?"}])], params)[0][0]
    computed = engine.prefix_cache.computed_tokens - before
    assert first.prompt_tokens > 60
    # only the new question's own tokens (and the template around them), not the 60-token system prompt again
    assert computed < second.prompt_tokens - 50


def test_the_lean_step_takes_a_norm_as_a_function_only_where_it_computes_llamas():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from thinktime.engines.lean_step import plain

    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    function = plain(norm)
    assert function is not norm
    x = torch.randn(3, 1, 16)
    assert torch.equal(function(x), norm(x))

    class LlamaRMSNorm(torch.nn.Module):  # the same name, Gemma's (1 + weight) scaling
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(16)), 1e-5

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    other = LlamaRMSNorm()
    assert plain(other) is other


def test_the_rows_own_positions_are_kept_in_fp32_from_bf16_states():
    layer = SharedPrefixLayer(*(torch.randn(1, 2, 5, 8).bfloat16() for _ in range(2)))
    for _ in range(2):  # the first write allocates, the second takes the in-place path
        keys, values = (torch.randn(3, 2, 1, 8).bfloat16() for _ in range(2))
        got_keys, got_values = layer.update(keys, values)
        assert got_keys.dtype == got_values.dtype == torch.float32
        assert torch.equal(got_keys[..., -1:, :], keys.float()) and torch.equal(got_values[..., -1:, :], values.float())
    assert layer.own_length() == 2
