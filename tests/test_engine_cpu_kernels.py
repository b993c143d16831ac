"""The CPU decoding path: oneDNN-packed linear layers, a KV cache that grows in place, and one-query
attention as matrix products.

Each is checked against what it replaces, on the real embedded model where it matters: packed
layers against F.linear, the growing cache against transformers' DynamicCache update by update,
the decode attention against sdpa over a left-padded batch.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from thinktime import models
from thinktime.engines import cpu_attention
from thinktime.engines.growing_cache import GrowingLayer, growing, new_growing_cache
from thinktime.engines.onednn import PackedLinear, pack_linears, unavailable_reason
from thinktime.types import Prompt, SamplingParams


def _load(dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m").path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def plain_and_packed():
    plain, packed = _load(), _load()
    if unavailable_reason(packed):
        pytest.skip(f"oneDNN packing unavailable here: {unavailable_reason(packed)}")
    return plain, packed, pack_linears(packed)


def test_every_linear_is_packed_and_logits_match(plain_and_packed):
    plain, packed, swapped = plain_and_packed
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert swapped == linears > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert "oneDNN-packed" in repr(packed.lm_head)
    ids = torch.tensor([[1, 504, 3658, 314, 1789, 2117, 28, 3001, 30, 216]])
    with torch.inference_mode():
        want, got = plain(ids).logits, packed(ids).logits
    assert torch.allclose(got, want, atol=2e-3 * want.abs().max().item())
    assert torch.equal(got[0, -1].topk(5).indices, want[0, -1].topk(5).indices)


def test_packed_layer_handles_batches_and_bias():
    linear = nn.Linear(64, 96, bias=True)
    layer = PackedLinear(linear)
    for shape in ((1, 64), (8, 1, 64), (3, 17, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(layer(x), linear(x), atol=1e-4)


def test_fused_projections_give_each_projection_in_any_order_and_on_any_input():
    from thinktime.engines.onednn import fused_product

    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj, block.o_proj = (nn.Linear(32, n, bias=True) for n in (32, 8, 8, 32))
    plain = {name: getattr(block, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert pack_linears(block) == 4
    product = fused_product(block.q_proj, block.k_proj, block.v_proj)
    assert product is not None and product.sizes == [32, 8, 8] and type(block.o_proj) is PackedLinear
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        for name, inputs in (("q_proj", x), ("k_proj", x), ("v_proj", x),  # as attention calls them
                             ("v_proj", y), ("q_proj", x), ("k_proj", y), ("k_proj", y)):  # any other way
            assert torch.allclose(getattr(block, name)(inputs), plain[name](inputs), atol=1e-5), name
        q, k, v = product.linear(x).split(product.sizes, dim=-1)
        assert torch.allclose(k, plain["k_proj"](x), atol=1e-5)
    assert fused_product(block.k_proj, block.q_proj, block.v_proj) is None  # parts out of order


def test_the_switch_turns_packing_off(monkeypatch):
    monkeypatch.setenv("THINKTIME_ONEDNN", "0")
    model = nn.Sequential(nn.Linear(8, 8))
    assert unavailable_reason(model) == "THINKTIME_ONEDNN=0"
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


def _random_kv(rows=2, positions=3):
    return torch.randn(rows, 3, positions, 8), torch.randn(rows, 3, positions, 8)


def test_growing_layer_matches_dynamic_layer_update_by_update():
    plain, grown = DynamicLayer(), GrowingLayer()
    for positions in (5, 1, 1, 300, 1, 1):  # 300 overflows the first buffer: it is reallocated
        keys, values = _random_kv(positions=positions)
        want, got = plain.update(keys, values), grown.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert grown.get_seq_length() == plain.get_seq_length() == 309


def test_growing_layer_after_crop_select_and_repeat():
    plain, grown = DynamicLayer(), GrowingLayer()
    for layer in (plain, grown):
        layer.update(*_random_kv(positions=6))
    plain.keys, plain.values = grown.keys.clone(), grown.values.clone()
    for change in (lambda layer: layer.crop(-2),  # a view of the same buffer, shorter
                   lambda layer: layer.batch_select_indices(torch.tensor([1])),  # new tensors
                   lambda layer: layer.batch_repeat_interleave(3)):
        change(plain), change(grown)
        keys, values = _random_kv(rows=plain.keys.shape[0], positions=1)
        want, got = plain.update(keys, values), grown.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_growing_layer_refuses_states_of_another_batch_as_dynamic_layer_does():
    for layer in (DynamicLayer(), GrowingLayer()):
        layer.update(*_random_kv(rows=3, positions=4))
        with pytest.raises(RuntimeError):  # torch.cat's size mismatch, or the copy's
            layer.update(*_random_kv(rows=1, positions=1))


def test_growing_cache_gives_the_model_the_same_logits():
    model = _load()
    prompt, steps = torch.tensor([[1, 504, 3658, 314, 1789]]), torch.tensor([[2117], [28], [3001]])
    with torch.inference_mode():
        logits = []
        for cache in (DynamicCache(config=model.config), new_growing_cache(model.config)):
            model(prompt, cache=cache, use_cache=True)
            logits.append(torch.stack([model(step[None], cache=cache, use_cache=True).logits for step in steps]))
        assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_growing_keeps_a_filled_cache():
    cache = DynamicCache(ddp_cache_data=[_random_kv()])
    keys = cache.layers[0].keys.clone()
    converted = growing(cache)
    assert type(converted.layers[0]) is GrowingLayer and torch.equal(converted.layers[0].keys, keys)


def test_engine_uses_both_on_cpu_and_greedy_stream_equals_generate(engine):
    assert engine.device == "cpu" and engine.grow_cache_in_place and engine.cpu_decode_attention
    assert engine.packed_linears > 0 or unavailable_reason(engine.model) is not None
    prompt, greedy = Prompt.of([{"role": "user", "content": "What is 3 + 4?"}]), SamplingParams(max_new_tokens=24)
    text = engine.generate([prompt], greedy)[0][0].text
    assert text and "".join(d.text for d in engine.stream(prompt, greedy)) == text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa_with_padding(dtype):
    plain, switched = _load(dtype), _load(dtype)
    assert cpu_attention.use_for(switched) and switched.config._attn_implementation == cpu_attention.ATTENTION_NAME
    ids = torch.randint(5, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row: its padding must stay masked in every decoding step
    results = []
    with torch.inference_mode():
        for model in (plain, switched):
            cache, step_mask = new_growing_cache(model.config), mask
            prompt = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
            steps = []
            for token in (100, 101, 102):
                step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                steps.append(model(torch.full((3, 1), token), attention_mask=step_mask, cache=cache,
                                   use_cache=True).logits)
            results.append((prompt, torch.cat(steps, dim=1)))
    (want_prompt, want), (got_prompt, got) = results
    assert torch.equal(got_prompt, want_prompt)  # prompts still go through sdpa
    tolerance = 1e-4 if dtype == torch.float32 else 0.05  # bf16: the softmax here is in fp32
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_decode_attention_leaves_other_choices_alone():
    model = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m").path, attn_implementation="eager")
    assert not cpu_attention.use_for(model) and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("preset, expected", [({}, "10000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "unset"),
                                              ({"GOMP_SPINCOUNT": "5"}, "5")])
def test_import_sets_a_short_openmp_spin_unless_the_user_chose(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
    code = "import thinktime, os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_the_cpu_default_is_bf16_where_the_cpu_multiplies_it(engine):
    from thinktime.engines.device import pick_dtype
    from thinktime.engines.onednn import cpu_has_bf16

    assert engine.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert pick_dtype("fp32", "cpu", 10**9) == torch.float32  # --dtype always wins
