"""KV-cache reuse: prompts that continue a previous one, n samples of one prompt, batches with one start.

Strategies that grow a chain step by step send the same long prefix again and again (system
prompt + question + the steps so far). Instead of prefilling it in full at every step, we keep the
KV cache of recently seen prompts (all tokens but the last) and, for a new prompt, prefill only
the tokens after the longest start it shares with any cached prompt (so the next question after
the same system prompt starts from the previous question's cache, cut to that prompt). Entries are evicted least recently used beyond
`max_tokens` cached tokens in all. The same mechanism prefills a prompt once for its n samples,
and the common start of a batch of prompts (the system prompt before 16 eval questions) once for
all of them.

Only plain dynamic caches (every layer full attention) are reused; other models simply go
without. The reused cache gives the same logits as a full prefill up to floating-point rounding,
so a greedy continuation can differ from an uncached one where two tokens are near-tied; this is
why the engine never uses it for a single fresh greedy prompt (a plain solve).
"""
from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from transformers import DynamicCache

from thinktime.engines.shared_prefix import shared_prefix_cache


def cache_kwarg(model) -> str:
    """The name generate()/forward() take the cache by: `cache` in newer transformers, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


MIN_SHARED = 16  # a batch's rows share a prefix this long or longer: it is prefilled once for all of them


def _shared_length(a: tuple[int, ...], b: tuple[int, ...], known: int = 0) -> int:
    """How many first tokens a and b share, given that the first `known` are shared (binary search over
    slice comparisons, which run in C)."""
    low, high = known, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def common_prefix_length(rows: list[list[int]]) -> int:
    first = tuple(rows[0])
    return min(_shared_length(first, tuple(row)) for row in rows)


class PrefixCache:
    def __init__(self, model, max_tokens: int = 32768):
        self.model = model
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()
        self.last_logits: dict[tuple[int, ...], torch.Tensor] = {}  # [vocab] after each entry's last token
        self.enabled = max_tokens > 0
        self.kwarg = cache_kwarg(model)
        # Only the KV cache is wanted: the LM head over every prompt position costs as much as a few layers.
        self._no_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}
        self.reused_tokens = 0  # prompt tokens served from the cache
        self.computed_tokens = 0  # prompt tokens prefilled here

    def batch_for(self, rows: list[list[int]], n: int, keep_rows: bool = True) -> DynamicCache | None:
        """A left-padded cache covering all but the last token of each row, each row repeated `n` times
        (the layout generate() sees for these rows padded to one width), or None to go without.
        `keep_rows=False` keeps only the rows' shared prefix, for prompts unlikely to come again
        (a batch of fresh questions), so they do not push out entries that will be reused."""
        if not self.enabled or any(len(r) < 2 for r in rows):
            return None
        shared = common_prefix_length([r[:-1] for r in rows]) if len(rows) > 1 else 0
        if shared >= MIN_SHARED:  # e.g. the system prompt of a batch of questions: prefilled once, not per row
            self.prefill(rows[0][:shared])
        caches = [self.prefill(r[:-1], keep=keep_rows) for r in rows]
        if any(c is None for c in caches):
            return None
        width = max(len(r) for r in rows) - 1
        layers = []
        for li in range(len(caches[0].layers)):
            keys, values = [], []
            for row, cache in zip(rows, caches):
                pad = width - (len(row) - 1)  # left padding, masked by the attention mask
                keys.append(torch.nn.functional.pad(cache.layers[li].keys, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(cache.layers[li].values, (0, 0, pad, 0)))
            layers.append((torch.cat(keys).repeat_interleave(n, 0), torch.cat(values).repeat_interleave(n, 0)))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def prefill(self, ids: list[int], keep: bool = True) -> DynamicCache | None:
        """The cache of exactly `ids`, computed from the longest cached start of them (and kept).
        With reuse off (`enabled` false) it is computed in full and not kept."""
        return self.prefill_with_logits(ids, keep)[0]

    def prefill_with_logits(self, ids: list[int], keep: bool = True) -> tuple[DynamicCache | None, torch.Tensor | None]:
        """`prefill`, and the logits after the last of `ids` ([vocab]) where they are known: computed now,
        or kept from when they were. Sampling can start from them without a forward of its own."""
        key = tuple(ids)
        start, base = self._longest(key) if self.enabled else (0, None)
        if start == len(key):
            self.reused_tokens += start
            return base, self.last_logits.get(key)
        cache = self._copy(base) if base is not None else DynamicCache(config=self.model.config)
        device = self.model.device
        out = self.model(input_ids=torch.tensor([list(key[start:])], device=device), use_cache=True,
                         **{self.kwarg: cache}, **self._no_logits)
        cache = getattr(out, "cache", None) or out.past_key_values
        if not all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers):
            self.enabled = False  # sliding windows or other layer kinds: reuse is not safe
            self.clear()
            return None, None
        logits = out.logits[0, -1]
        self.reused_tokens += start
        self.computed_tokens += len(key) - start
        if keep and self.enabled:
            self.entries[key] = cache
            self.last_logits[key] = logits
            self._evict()
        return cache, logits

    def clear(self) -> None:
        self.entries.clear()
        self.last_logits.clear()

    def _longest(self, key: tuple[int, ...]) -> tuple[int, DynamicCache | None]:
        """The longest start of `key` that any entry holds, and that entry's cache cut to it: the next
        question after a system prompt finds it in the previous question's entry."""
        best, found = 0, None
        for ids in self.entries:
            if len(ids) > best and ids[:best + 1] == key[:best + 1]:
                best, found = _shared_length(ids, key, best + 1), ids
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        cache = self.entries[found]
        return best, cache if best == len(found) else self._copy(cache, best)

    def _copy(self, cache: DynamicCache, length: int | None = None) -> DynamicCache:
        # New layer objects over the same tensors (or their first `length` positions): extending the copy
        # concatenates into new tensors, so the cached entry stays as it was.
        return DynamicCache(ddp_cache_data=[(layer.keys[..., :length, :], layer.values[..., :length, :])
                                            for layer in cache.layers], config=self.model.config)

    def _evict(self) -> None:
        total = sum(len(k) for k in self.entries)
        while total > self.max_tokens and len(self.entries) > 1:
            ids, _ = self.entries.popitem(last=False)
            self.last_logits.pop(ids, None)
            total -= len(ids)

    def shared_inputs(self, enc, n: int, keep: bool, pad: int):
        """(cache, input_ids, attention_mask, first logits or None) for decoding the rows of `enc` (each n
        times) over a cache of their common start, held once; None where they share too little or the
        model's cache cannot."""
        rows = unpadded(enc)
        device = self.model.device
        if len(rows) == 1:  # one prompt: all of it is shared, and its logits give every row its first token
            prefix, logits = self.prefill_with_logits(rows[0], keep=keep)
            cache = None if prefix is None or logits is None else shared_prefix_cache(prefix, self.model.config)
            if cache is not None:
                ids = torch.tensor(rows, device=device).repeat_interleave(n, 0)
                return cache, ids, torch.ones_like(ids), logits[None].expand(n, -1)
        # All but each row's last token can be shared: the first forward needs at least one token per row.
        length = common_prefix_length([row[:-1] for row in rows])
        if length < (1 if len(rows) == 1 else MIN_SHARED):
            return None
        prefix = self.prefill(rows[0][:length], keep=keep or len(rows) > 1)
        cache = None if prefix is None else shared_prefix_cache(prefix, self.model.config)
        if cache is None:
            return None
        # [shared start][left padding][the row's own tokens]: positions come from the mask, so they run on
        # across the padding, and the first forward takes everything after the shared start.
        own = [row[length:] for row in rows]
        width = max(len(tokens) for tokens in own)
        ids = [rows[0][:length] + [pad] * (width - len(tokens)) + tokens for tokens in own]
        mask = [[1] * length + [0] * (width - len(tokens)) + [1] * len(tokens) for tokens in own]
        return (cache, torch.tensor(ids, device=device).repeat_interleave(n, 0),
                torch.tensor(mask, device=device).repeat_interleave(n, 0), None)


def unpadded(enc) -> list[list[int]]:
    """Each prompt's token ids without the left padding of the batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
