"""A stage's KV caches: a job's keys and values for the layers the stage owns, growing in place.

transformers' ``DynamicLayer`` appends a step's key/value column with ``torch.cat``: every decode step copies
the job's whole cache, once per layer. A batch of decode steps (``Stage.forward_batch``) paid that twice (the
batch's padded copy, then each job's own cache), and a zero-filled padded copy besides. For a Qwen-shaped
stage of 17 layers running 8 jobs at 512 positions, the cache copies took longer than the weights (an 8-row
step 125 ms against 86 ms at 16 positions; ``torch.cat`` alone 76 ms of it). ``GrowingLayer`` keeps its
keys and values in buffers with room at the end: a step writes only its own columns, and the buffer is
copied only when it grows (by a quarter, at least ``GROW_MIN`` positions), so a job's steps cost the same
at position 2000 as at position 20. ``keys`` and ``values`` stay what transformers and the stage read: the
filled part (a view). The price is memory: a job's buffers hold up to a quarter (at least ``GROW_MIN``
positions) more than it has filled; ``AZU_MAX_CACHED_TOKENS`` counts the positions filled, and the worker's
``kv_cache_bytes`` metric the buffers whole.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

# Positions a buffer grows by at least (and a quarter of its length, if more): a decode step then copies
# the cache once every GROW_MIN steps at most, and a long prompt's cache holds at most a quarter more.
GROW_MIN = 64


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` (``[batch, heads, positions, head_dim]``) are the filled
    front of buffers with room for more positions: ``update`` writes the new columns in place."""

    _room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        n = key_states.shape[-2]
        if not self._holds(length, length + n, key_states):
            self._grow(length, length + n, key_states, value_states)
        assert self._room is not None
        keys, values = self._room
        keys[..., length:length + n, :] = key_states
        values[..., length:length + n, :] = value_states
        self.keys, self.values = keys[..., :length + n, :], values[..., :length + n, :]
        return self.keys, self.values

    def reserve(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Start from ``keys``/``values`` (owned by this layer from now on: written into, not copied) with
        their last ``room`` positions free: the next update of that many columns writes them there."""
        self.lazy_initialization(keys, values)
        filled = keys.shape[-2] - room
        self._room = (keys, values)
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]

    def _holds(self, length: int, needed: int, like: torch.Tensor) -> bool:
        """Whether the buffers hold this layer's ``length`` positions at their front (nothing replaced
        ``keys`` since: a crop or a reorder would) and have room for ``needed`` positions of ``like``'s
        batch, heads and head size."""
        if self._room is None:
            return False
        keys = self._room[0]
        return (keys.shape[-2] >= needed and keys.shape[:-2] == like.shape[:-2]
                and keys.shape[-1] == like.shape[-1] and keys.dtype == like.dtype
                and (length == 0 or (self.keys is not None and self.keys.data_ptr() == keys.data_ptr())))

    def _grow(self, length: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        size = needed + max(GROW_MIN, needed // 4)
        keys = key_states.new_empty(*key_states.shape[:-2], size, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], size, value_states.shape[-1])
        if length:
            assert self.keys is not None and self.values is not None
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._room = (keys, values)

    def reset(self) -> None:
        self._room = None
        super().reset()


class StageCache(DynamicCache):
    """A full-size DynamicCache whose length/mask questions are answered by a layer the stage owns, and
    whose full-attention layers grow in place (``GrowingLayer``)."""

    def __init__(self, config: Any, owned: range) -> None:
        super().__init__(config=config)
        self.owned = owned
        for idx in owned:
            if idx < len(self.layers) and type(self.layers[idx]) is DynamicLayer:
                self.layers[idx].__class__ = GrowingLayer
        sliding = self.is_sliding
        self._full = next((i for i in owned if not sliding[i]), owned.start)
        self._sliding = next((i for i in owned if sliding[i]), owned.start)

    def _owned(self, layer_idx: int) -> int:
        if layer_idx in self.owned:
            return layer_idx
        is_sliding = layer_idx < len(self.layers) and self.is_sliding[layer_idx]
        return self._sliding if is_sliding else self._full

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._owned(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._owned(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._owned(layer_idx))
