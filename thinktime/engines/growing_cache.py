"""A dynamic KV cache that grows in place, for decoding without copying the whole cache each step.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies
every cached position of every layer at every step: decoding T tokens costs O(T^2) copying, and
on a CPU it was the largest single cost of a step after the matrix products (40% of a step for
8 rows of a 135M model at 300 positions). GrowingLayer keeps the keys and values in a buffer with
room to spare, writes the new positions into it, and hands the model views of the filled part; the
buffer is reallocated (with half again as much room) only when it is full.

Everything else DynamicLayer does (crop, reorder for beams, batch selection) keeps working: those
methods replace `keys`/`values` with new tensors, and the next update sees that the views are no
longer its buffer's and adopts them into a new buffer.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_ROOM = 256  # positions added at least on each reallocation


class GrowingLayer(DynamicLayer):
    # The dtype the buffers keep; None: the dtype of the first keys written (a subclass may fix it).
    storage_dtype: torch.dtype | None = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys/values last handed out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if not self._owns_views(key_states) or needed > self._key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, length, needed)
        self._key_buffer[:, :, length:needed].copy_(key_states)  # converts to the storage dtype
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._views = None
        super().reset()

    def _owns_views(self, key_states: torch.Tensor) -> bool:
        """Whether keys/values are still the views of this layer's buffers it handed out last (not replaced by
        crop, reorder or batch selection) and the new states have their rows: one identity check per step."""
        return self._views is not None and self.keys is self._views[0] and self.values is self._views[1] \
            and key_states.shape[0] == self.keys.shape[0]

    def _dtype_for(self, states: torch.Tensor) -> torch.dtype:
        return self.storage_dtype or states.dtype

    def _reallocate(self, key_states, value_states, length: int, needed: int) -> None:
        capacity = needed + max(_MIN_ROOM, needed // 2)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            shape = (*new.shape[:2], capacity, new.shape[-1])
            buffer = torch.empty(shape, dtype=self._dtype_for(new), device=new.device)
            if length:
                buffer[:, :, :length].copy_(old)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers


def growing(cache: DynamicCache) -> DynamicCache:
    """The same cache with its plain full-attention layers replaced by GrowingLayers (data kept);
    other layer kinds (sliding windows, linear attention) stay as they are."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            replacement = GrowingLayer()
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                replacement.update(layer.keys, layer.values)
            cache.layers[index] = replacement
    return cache


def new_growing_cache(config) -> DynamicCache:
    return growing(DynamicCache(config=config))
