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

Jobs that decode together keep their caches together (``BatchRows``): a batch of J jobs used to copy every
job's keys and values into a padded batch cache before each step and hand the new columns back after it (a
Qwen-shaped stage, 8 jobs: 2.3 + 2.0 ms of a 56 ms step on a CPU; on a GPU, four small copies per job and
layer). Now the jobs of a batch are the rows of one buffer per layer, and the next batch of the same jobs runs
on those buffers in place, each row writing its new columns at its own next positions (``RowsLayer``); the
rows are copied only when a batch's jobs change (a job joins, leaves or runs alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


# Where a job's past is before it joins a ``BatchRows``: its keys and values for a layer index
# (``[heads, positions, head_dim]``).
Past = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class BatchRows:
    """The keys and values of ``size`` jobs, one row each, in one buffer per layer (``[size, heads, room,
    head_dim]``, zeroed when made: a masked position must still be finite, or 0 x NaN reaches the real rows).
    Rows are left-aligned (a row's positions start at column 0); a row's columns past its length are free.

    Made empty with the jobs' ``pasts``: a layer's buffers are made by the batch's first update of that layer
    (only then are its heads and head size known), from those pasts; after that the pasts are dropped
    (``forget_pasts``), and so is the memory they held."""

    def __init__(self, pasts: list[Past | None]) -> None:
        self.size = len(pasts)
        self.members: list[Any] = []  # the jobs whose rows these are (row order), kept by the stage
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._pasts: list[Past | None] | None = pasts
        self.graph: Any = None  # the decode graph (azu.engine.graphs) whose rooms these buffers are, if any

    def make(self, layers: Iterable[int], room: int) -> None:
        """Every layer's buffers now, ``room`` positions a row exactly (a batch decode graph's rooms), from
        the pasts (rows without one, a graph's padding, stay zeros); then the pasts go."""
        assert self._pasts is not None
        first = next(past for past in self._pasts if past is not None)
        for idx in layers:
            k, v = first(idx)
            self.reserve(idx, k[None], v[None], room, grow=False)
        self.forget_pasts()

    def reserve(self, idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                span: int, *, grow: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``idx``'s buffers, made or grown (by a quarter, at least ``GROW_MIN`` positions, unless not
        ``grow``) so that every row has ``span`` positions."""
        keys, values = self.keys.get(idx), self.values.get(idx)
        if keys is not None and values is not None and keys.shape[2] >= span:
            return keys, values
        room = span + max(GROW_MIN, span // 4) if grow else span
        new_k = key_states.new_zeros(self.size, key_states.shape[1], room, key_states.shape[3])
        new_v = value_states.new_zeros(self.size, value_states.shape[1], room, value_states.shape[3])
        if keys is not None and values is not None:
            new_k[:, :, : keys.shape[2]] = keys
            new_v[:, :, : values.shape[2]] = values
        elif self._pasts is not None:
            for row, past in enumerate(self._pasts):
                if past is not None:
                    k, v = past(idx)
                    new_k[row, :, : k.shape[-2]] = k
                    new_v[row, :, : v.shape[-2]] = v
        self.keys[idx], self.values[idx] = new_k, new_v
        # A decode graph over the old buffers no longer holds these rows (and would keep the old buffers).
        self.graph = None
        return new_k, new_v

    def forget_pasts(self) -> bool:
        """Drop the pasts (after the batch that made the buffers); whether there were any (new rows)."""
        new, self._pasts = self._pasts is not None, None
        return new

    def row(self, idx: int, row: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row ``row`` of layer ``idx``'s buffers (``[1, heads, room, head_dim]`` views), if made."""
        if idx not in self.keys:
            return None
        return self.keys[idx][row : row + 1], self.values[idx][row : row + 1]


class RowsLayer(DynamicLayer):
    """A batch's cache layer over ``BatchRows``: row b's new columns (``[b, :, q]`` of an update) go to
    columns ``where[b, q]`` of its row, and attention reads the first ``span`` columns of every row (the
    batch's mask says which of them each query sees)."""

    def __init__(self, rows: BatchRows, idx: int, where: torch.Tensor, span: int,
                 batch: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.idx, self.where, self.span = rows, idx, where, span
        self._batch = batch  # [size, 1]: each row's index, shared by the batch's layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.rows.reserve(self.idx, key_states, value_states, self.span)
        keys[self._batch, :, self.where] = key_states.transpose(1, 2)
        values[self._batch, :, self.where] = value_states.transpose(1, 2)
        self.keys, self.values = keys[:, :, : self.span], values[:, :, : self.span]
        return self.keys, self.values
