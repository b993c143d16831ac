"""A KV cache whose first positions are one prompt shared by every row, and attention that reads them once.

Why: n samples of one question (self-consistency, best-of-n), or a batch of questions after one
system prompt, start from the same tokens. A plain cache holds those positions once per row, and
each decoding step reads all n copies: with SmolLM2 at 8 rows and a 480-token thinking prompt that
was a quarter of a CPU step. Here the shared positions are kept once ([1, kv heads, P, dim]) and
each row keeps only its own positions after them (a GrowingLayer). One-query attention computes
the scores against the shared keys for all rows and heads in one matrix product (the n rows stack
as extra queries of each KV head, as in cascade attention), the scores against each row's own keys
per row, and takes one softmax over both, all in fp32: the same attention, reading the shared prompt once
per step instead of n times. Steps with several queries (a prompt's remainder) see the shared
positions expanded to every row and go to sdpa.

The layer hands the model only the rows' own keys and values, tagged with the shared part
(`SHARED`); only the attention function registered in cpu_attention reads that tag, which is why
the engine uses this cache only where that function is the model's attention.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from thinktime.engines.growing_cache import GrowingLayer

SHARED = "thinktime_shared_prefix"  # attribute on the keys tensor handed to attention: the SharedPrefixLayer


class SharedPrefixLayer(GrowingLayer):
    # The rows' own positions are kept in fp32 too: one position per step is converted (as it is written), not all.
    storage_dtype = torch.float32

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        if keys.shape[0] != 1:
            raise ValueError(f"the shared prefix is one row, got {keys.shape[0]}")
        self.prefix_length = keys.shape[-2]
        self.prefix_keys, self.prefix_values = keys, values  # [1, kv heads, P, dim]
        # Laid out once as the matrix products read them, keys as [kv heads, dim, P] and values as [kv heads,
        # P, dim], in fp32: PyTorch's CPU bf16 batched products of these shapes are slower than fp32 ones.
        self.keys_by_head = keys[0].transpose(-1, -2).float().contiguous()
        self.values_by_head = values[0].float().contiguous()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        setattr(keys, SHARED, self)
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def own_length(self) -> int:
        return super().get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.own_length() > 0:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]

    def expanded(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence per row (shared part copied to each row): for steps with several queries."""
        rows, dtype = keys.shape[0], self.prefix_keys.dtype
        return (torch.cat([self.prefix_keys.expand(rows, -1, -1, -1), keys.to(dtype)], dim=-2),
                torch.cat([self.prefix_values.expand(rows, -1, -1, -1), values.to(dtype)], dim=-2))


def shared_prefix_cache(prefix: DynamicCache, config) -> DynamicCache | None:
    """A cache over `prefix` (one row) that rows extend on their own; None where a layer is not plain
    full attention (sliding windows and other kinds keep the ordinary path)."""
    if any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.shape[0] != 1 or not layer.keys.numel()
           for layer in prefix.layers):
        return None
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(prefix.layers):
        return None
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values) for layer in prefix.layers]
    return cache


def shared_of(keys: torch.Tensor) -> SharedPrefixLayer | None:
    return getattr(keys, SHARED, None)


def one_query_attention(shared: SharedPrefixLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        own_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of one query per row over the shared positions and the row's own; [rows, 1, heads, dim].

    `own_mask` covers the row's own positions only (the shared ones are never padding), as sdpa's:
    bool (True where attended) or additive float, or None."""
    rows, heads, _, dim = query.shape
    groups = keys.shape[1]
    per_group = heads // groups
    dtype = query.dtype
    query, keys, values = query.float(), keys.float(), values.float()  # the row's own positions: a few, cheap
    stacked = query.reshape(rows, groups, per_group, dim)  # query head h reads KV group h // per_group
    # Shared part: every row's queries of a KV group as one matrix, [groups, rows * per_group, dim] @ [groups, dim, P].
    by_group = stacked.transpose(0, 1).reshape(groups, rows * per_group, dim)
    shared_scores = torch.bmm(by_group, shared.keys_by_head).view(groups, rows, per_group, -1).transpose(0, 1)
    own_scores = torch.matmul(stacked, keys.transpose(-1, -2))  # [rows, groups, per_group, own]
    scores = torch.cat([shared_scores, own_scores], dim=-1).mul_(scale)
    if own_mask is not None:
        own = scores[..., shared.prefix_length:]
        if own_mask.dtype == torch.bool:
            own.masked_fill_(~own_mask, float("-inf"))
        else:
            own.add_(own_mask)
    probs = torch.softmax(scores, dim=-1)
    shared_probs = probs[..., :shared.prefix_length].transpose(0, 1).reshape(groups, rows * per_group, -1)
    out = torch.bmm(shared_probs, shared.values_by_head).view(groups, rows, per_group, dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., shared.prefix_length:], values)  # [rows, groups, per_group, dim]
    return out.reshape(rows, 1, heads, dim).to(dtype)
