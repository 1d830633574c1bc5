"""Decode graphs: a job's one-token step at a stage (or a batch's) as one replay of a captured CUDA graph.

Why: on a GPU a small model's decode step is bound by launches, not by the device. transformers' eager
forward issues some fifteen kernels a layer from Python, so a 12-layer stage of a Qwen2.5-0.5B shape spends
milliseconds of CPU per step on a fraction of a millisecond of GPU work. A CUDA graph records the step's
kernels once and replays them all with one launch.

A graph needs fixed shapes, fixed addresses and no host sync inside. So a graphed step:
- keeps the job's keys and values in buffers of a fixed room (a power of two, at least ``MIN_ROOM``
  positions): the job's own ``GrowingLayer`` rooms (azu.engine.kvcache), so eager steps, batches and the graph
  share one cache and nothing is copied per step;
- writes its new column at ``pos``, a one-element device tensor the stage sets before the replay (a fill: no
  wait for the device), with ``index_copy_``;
- attends over the whole room under an additive mask made inside the graph from ``pos`` (columns after it
  masked). Those columns hold zeros (a job moving into a room zeroes what follows its positions: a NaN
  another job left there would pass through a zero weight) or the job's own earlier values;
- takes its input from a static tensor (copied in before the replay) and leaves its output in another (cloned
  after it: the hand-over sends the output while the next step runs).

A graph stays with its job while the job's rooms are the ones it recorded and have a free column. When the
room is full the job moves (one copy) into one twice as long, under another graph. A graph a job no longer
uses (it ended, or moved on) is kept as a spare (``SPARES`` a stage, their rooms ``SPARE_POSITIONS`` in all):
the next job whose cache fits its room moves into its buffers (one copy of the prompt's keys and values) and
replays it without recording anything.

Batch decode graphs: jobs that decode together (a micro-batch, azu.network.batching) step as one replay of a
graph over the rows of their batch (``BatchRows``, one buffer ``[rows, heads, room, head_dim]`` a layer), each
row writing its column at its own ``pos[b]`` (one indexed copy a layer) under its own mask row. A stage makes
one when a batch is too large for one replay per job (``GRAPHED_JOBS``) or when the same jobs meet again (a
recording is paid back by the batch's next steps, not by a batch that meets once): the jobs' caches are
copied into new rows of a ``room_for`` room, their own graphs go to the spares, and the graph is recorded. It
serves the batch while its jobs stay together and their rows have a free column; a job that leaves (runs
alone, ends, or a new job joins) disbands the rows, and the next batch makes new ones.

On a CPU (``graphs="on"``, for tests) the same static step runs eagerly: the step the graph would record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 256  # positions: a job's first graph, and the smallest spare worth keeping
SPARES = 4  # graphs a stage keeps for the next jobs (each holds its room's keys and values)
# Jobs a stage replays graphs for at once: it records for a new job only while it holds at most this many, and
# on a GPU a batch of at most this many one-token steps runs as one replay per job, not as an eager batch.
# Measured on an H200 (bench/gpu.sh, Qwen2.5-0.5B shape over 2 workers): eager steps, launch-bound, gave one
# stream 6.6-28 tok/s and 4 streams in eager batches 21-25 tok/s in all; replays gave one stream 218-225.
GRAPHED_JOBS = 16
SPARE_POSITIONS = 4096  # and the positions their rooms hold together, at most (memory no job's bound counts)
WARMUP_STEPS = 2  # eager runs on the capture stream before the first capture (cuBLAS, allocator)
# A batch decode graph's rows: a batch's jobs padded up to a few sizes (powers of two up to PAD_STEP, then its
# multiples; rows_for). On an H200 a stage's first recording of a batch size took 45-100 ms (once 623 ms), a
# later one of the same size 3-14 ms, and a burst of 64 streams brought batches of 3 to 41 jobs, most of them
# sizes seen once (bench/gpu.sh, worker logs): padded, a stage records a few sizes, and the first of each
# when it loads (Stage.warm_graphs, up to WARM_BATCH_ROWS).
PAD_STEP = 8
WARM_BATCH_ROWS = (2, 4, 8, 16, 24, 32)
BATCH_GRAPH_FAILURES = 3  # recordings of batch graphs that may fail (not for memory) before a stage stops
RETRY_AFTER_OOM_S = 10.0  # after the device ran out of memory for a graph, no new one is tried for this long


def room_for(positions: int, limit: int) -> int:
    """The room a graph for a job of ``positions`` positions gets: the next power of two, at least
    ``MIN_ROOM``, but no more than the model's context (``limit``) if that is enough."""
    return max(positions, min(_doubled_to(MIN_ROOM, positions), limit))


def _doubled_to(start: int, at_least: int) -> int:
    """``start`` doubled until it is ``at_least`` or more."""
    while start < at_least:
        start *= 2
    return start


def rows_for(jobs: int) -> int:
    """The rows of a batch decode graph for ``jobs`` jobs (two or more): the next power of two up to
    ``PAD_STEP``, then the next multiple of ``PAD_STEP``; the rows after the jobs' are padding (at most 7)."""
    if jobs <= PAD_STEP:
        return _doubled_to(2, jobs)
    return -(-jobs // PAD_STEP) * PAD_STEP


class StaticLayer(DynamicLayer):
    """A cache layer over a fixed room ``[rows, heads, room, head_dim]``: an update writes each row's one
    column at that row's ``pos`` and attention reads the whole room (the step's mask hides the columns after
    each row's ``pos``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                 rows: torch.Tensor | None) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.room, self.pos, self.rows = (keys, values), pos, rows
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.room
        if self.rows is None:  # one row
            keys.index_copy_(2, self.pos, key_states)
            values.index_copy_(2, self.pos, value_states)
        else:  # row b's column at pos[b]: [rows, heads, head_dim] written in one indexed copy
            keys[self.rows, :, self.pos] = key_states[:, :, 0]
            values[self.rows, :, self.pos] = value_states[:, :, 0]
        return keys, values


class DecodeGraph:
    """One-token steps of ``rows`` jobs at once on the rooms ``rooms`` (layer index -> keys, values
    ``[rows, heads, room, head_dim]``; row b is one job's cache, all ``room`` positions long).

    ``forward(graph)`` is the stage's static step: it reads ``graph.x`` (one token or hidden state a row),
    ``graph.positions`` and ``graph.mask()``, runs the layers on a cache of ``graph.layers()``, and returns
    the output (a row each)."""

    def __init__(self, rooms: dict[int, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> None:
        some = next(iter(rooms.values()))[0]
        self.rooms = rooms
        self.rows = int(some.shape[0])
        self.room = int(some.shape[-2])
        self.device = some.device
        self.dtype = some.dtype  # the stage's: the mask's too
        self.pos = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.positions = self.pos.view(self.rows, 1)
        self._row_index = torch.arange(self.rows, device=self.device) if self.rows > 1 else None
        self._positions: list[int] | None = None  # what ``pos`` holds, for rows
        self.cols = torch.arange(self.room, device=self.device)
        self.x = x  # the static input (the graph's own: each step's is copied into it)
        self.out: torch.Tensor | None = None
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured

    def layers(self) -> dict[int, StaticLayer]:
        return {idx: StaticLayer(k, v, self.pos, self._row_index) for idx, (k, v) in self.rooms.items()}

    def mask(self) -> torch.Tensor:
        """The additive mask ``[rows, 1, 1, room]``: 0 up to each row's ``pos``, the dtype's minimum after."""
        hidden = (self.cols[None, :] > self.pos[:, None]).view(self.rows, 1, 1, self.room)
        return torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(
            hidden, torch.finfo(self.dtype).min)

    def fits(self, positions: int) -> bool:
        return positions <= self.room

    def _set_positions(self, positions: int | Sequence[int]) -> None:
        if isinstance(positions, int):
            self.pos.fill_(positions)  # a fill: no copy from the host
            return
        # Pad rows (after the jobs' rows) step at the first row's position: within the room, and one further
        # each step as the jobs' rows are (no copy from the host).
        positions = [*positions, *[positions[0]] * (self.rows - len(positions))]
        if self._positions is not None and all(
                p == q + 1 for p, q in zip(positions, self._positions, strict=True)):
            self.pos.add_(1)  # the rows' next step: no copy from the host (a pageable one waits for the GPU)
        else:
            self.pos.copy_(torch.as_tensor(positions, dtype=torch.long))
        self._positions = positions

    def capture(self, forward: Callable[[DecodeGraph], torch.Tensor], positions: int | Sequence[int], *,
                pool: Any, stream: Any, warmup: int) -> None:
        """Record ``forward`` (on a GPU; run first ``warmup`` times eagerly on ``stream``, as recording
        requires). Recording runs nothing; the warm-up runs write column ``positions[b]`` of row b of every
        room (a free one: the job's next), which its real step writes again."""
        self._set_positions(positions)
        if warmup:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        forward(self)
            finally:  # a failed warm-up too: the eager step after it writes the same column
                torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Not ``torch.cuda.graph(...)``: it also synchronizes, runs ``gc.collect()`` and empties the
        # allocator's cache before each recording (so every allocation after it is a fresh cudaMalloc),
        # paid by every job a stage records for. The recording stream waits for the work before it instead.
        # thread_local: another thread's CUDA call (the heartbeat's memory query) must not break it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self.out = forward(self)
                except BaseException:
                    with contextlib.suppress(Exception):  # the recording is broken anyway: end it
                        graph.capture_end()
                    raise
                graph.capture_end()
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = graph

    def step(self, forward: Callable[[DecodeGraph], torch.Tensor], x: torch.Tensor,
             positions: int | Sequence[int]) -> torch.Tensor:
        """The step of input ``x`` (a row each, for the first rows: the others are padding, whose input stays
        the zeros it was made with) at ``positions`` (a row each; an int for one row): the recorded graph
        replayed (its output's rows of ``x`` cloned), or on a CPU ``forward`` run eagerly."""
        used = self.rows if isinstance(positions, int) else len(positions)
        self.x[:used].copy_(x.view(used, *self.x.shape[1:]))
        self._set_positions(positions)
        if self.graph is None:
            return forward(self)[:used]
        self.graph.replay()
        assert self.out is not None
        return self.out[:used].clone()


def copy_into(graph: DecodeGraph, filled: dict[int, tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
    """Put a job's ``length`` cached positions (``filled``: layer -> keys, values, at least that long) at
    the front of ``graph``'s rooms, and zeros after them: the columns after them held another job's keys and
    values (a spare's last job), masked but read, and a NaN among them (a worker upstream can send one) would
    reach this job's output through the zero weight (0 x NaN)."""
    for idx, (keys, values) in filled.items():
        room_k, room_v = graph.rooms[idx]
        if room_k.data_ptr() != keys.data_ptr():
            room_k[..., :length, :] = keys[..., :length, :]
            room_v[..., :length, :] = values[..., :length, :]
            room_k[..., length:, :].zero_()
            room_v[..., length:, :].zero_()
