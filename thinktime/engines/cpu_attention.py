"""Attention for one decoding step on the CPU: the heads of a KV group share two matrix products.

Why: during decoding each row has one query. transformers' "sdpa" attention hands that to
PyTorch's CPU flash-attention kernel, which is built for long queries: with 8 rows, 9 heads in 3
KV groups and ~350 cached positions of SmolLM2 it takes most of a step in bf16 and a quarter of it
in fp32, on views of a cache that grows in place. Here the query heads of each KV group are stacked
(as transformers' own `pack_gqa` does) and attention is two batched matrix products with the
softmax in fp32 between them, reading the cached keys and values in place. Prompts (more than one
query) still go to the "sdpa" kernel, which is the right one for them.

With a shared-prefix cache (engines/shared_prefix.py) the keys are each row's own positions and the
prompt they share is read once for all rows.

It is registered with transformers' AttentionInterface under ATTENTION_NAME, with sdpa's masks, and
switched on per model (`use_for`) only where the model was using "sdpa".
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from thinktime.engines import shared_prefix

ATTENTION_NAME = "thinktime_cpu_decode"
SHARED_ONLY_NAME = "thinktime_cpu_shared_prefix"  # the shared-prefix steps only; the rest as sdpa


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    rows, heads, queries, dim = query.shape
    one_query = queries == 1 and not dropout and not any(
        kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
    scale = scaling if scaling is not None else dim ** -0.5
    shared = shared_prefix.shared_of(key)  # a shared-prefix cache: key and value are each row's own positions
    if shared is not None and one_query:
        own_mask = None if attention_mask is None else attention_mask[..., shared.prefix_length:]
        return shared_prefix.one_query_attention(shared, query, key, value, own_mask, scale), None
    if shared is not None:
        key, value = shared.expanded(key, value)
    if not one_query:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = key.shape[1]
    stacked = query.reshape(rows, groups, heads // groups, dim)  # query head h reads KV group h // (heads/groups)
    scores = torch.matmul(stacked, key.transpose(-1, -2)).float().mul_(scale)  # [rows, groups, heads/groups, kv]
    if attention_mask is not None:  # sdpa's mask: [rows or 1, 1, 1, kv], True (or 0.0) where attended
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [rows, groups, heads/groups, dim]
    return out.reshape(rows, 1, heads, dim), None


def shared_prefix_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """decode_attention over a shared-prefix cache, sdpa for everything else: for CPUs where sdpa wins
    the one-query steps of a plain cache (engines/cpu_tuning.py)."""
    if shared_prefix.shared_of(key) is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return decode_attention(module, query, key, value, attention_mask, *args, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    AttentionInterface.register(SHARED_ONLY_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_ONLY_NAME, sdpa_mask)


def use_for(model, one_query: bool = True) -> bool:
    """Switches a CPU model from "sdpa" to this attention (with one_query=False only for steps over a
    shared-prefix cache); leaves any other choice alone. True if switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    name = ATTENTION_NAME if one_query else SHARED_ONLY_NAME
    try:
        model.set_attn_implementation(name)
    except (ValueError, TypeError, AttributeError):  # a model that refuses custom attention keeps sdpa
        return False
    return model.config._attn_implementation == name
