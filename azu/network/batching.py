"""What a worker runs next: micro-batches of decode steps and chunks of prompts.

Two rules, both about keeping every stage of a pipeline busy without making anyone wait long:

- **Micro-batches.** With J jobs decoding through a route of H stages, a stage that ran all J steps as one
  batch would leave the other stages idle while it works (they alternate). Capped at about J / H rows, a
  batch is handed on as soon as it is done, so while one stage runs a batch the next stage runs the batch
  before: the pipeline fills.
- **Chunked prompts.** A prompt runs ``chunk`` tokens at a time (all prompts waiting at a stage share that
  budget, so many users starting together prefill as one batch), in turns with the decode batches: a long
  prompt holds the jobs that are decoding up for one chunk at a time, not for the whole prompt. With no
  other job in flight at the worker the chunk is ``ALONE_CHUNKS`` times longer (each chunk is a pass over
  the weights). Each chunk's output is handed on as soon as it has run: the next stage runs chunk k while
  this one runs chunk k+1, so a long prompt's time to first token is about the busiest stage's share plus a
  chunk at each later stage, not the sum of the stages. A queued prompt at a later stage may therefore hold
  only the positions that have arrived so far (``Queued.total`` says how many will).
- **Decode steps ride with short prompts.** Where the decode batch and the prompt chunk would pad little
  (``mixes_cheaply``), they run as one batch: one pass over the weights instead of two, and the jobs that
  were decoding and the ones that start travel on together from then on. Without it, a job whose prompt
  ran alone (it came first, the others while it ran) stays a micro-batch of its own for its whole life,
  and on a CPU, where a step costs the pass over the weights more than its rows, every round of the
  pipeline pays one pass more (bench/pipeline.py, P3: 16 streams formed batches of 1, 8 and 7 rows).

The queue lives for one forward task (``WorkerNode.process_pending``); it is empty when the task returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from azu.engine.span import Span

if TYPE_CHECKING:
    import torch

    from azu.network.wire import StepPayload

StageId = tuple[str, Span]


class Queued:
    """A step admitted to run at a stage: its input so far, how much of it has run (prompts run in chunks; a
    decode step is one chunk of one token), and how many positions it brings in all (``total``: a prompt
    at a later stage arrives in parts, as the stage before runs its chunks).

    The parts are kept as they came and joined only as far as a chunk needs (``rows``); parts that have run
    are let go. Joining every part as it arrives would copy the rows held again each time: quadratic in the
    number of parts, which the hop before chooses."""

    def __init__(self, step: StepPayload, x: torch.Tensor, total: int) -> None:
        self.step = step
        self.total = total
        self.done = 0  # positions run (from ``step.pos``)
        self._parts = [x]  # rows from position ``step.pos + self._first`` on (the first ones may have run)
        self._first = 0
        self._size = int(x.shape[0])

    @property
    def size(self) -> int:
        """Positions arrived so far (from ``step.pos``)."""
        return self._size

    @property
    def left(self) -> int:
        """Positions arrived and not run yet."""
        return self._size - self.done

    @property
    def complete(self) -> bool:
        return self._size >= self.total

    def extend(self, x: torch.Tensor) -> None:
        """The next part of the prompt arrived (its positions follow the ones held)."""
        self._parts.append(x)
        self._size += int(x.shape[0])

    def rows(self, n: int) -> torch.Tensor:
        """The next ``n`` positions not run yet (``n <= left``)."""
        import torch

        while self._first + int(self._parts[0].shape[0]) <= self.done:  # parts that have run
            self._first += int(self._parts[0].shape[0])
            self._parts.pop(0)
        start = self.done - self._first
        k, held = 1, int(self._parts[0].shape[0])
        while held < start + n:
            held += int(self._parts[k].shape[0])
            k += 1
        if k > 1:  # join from the first row not run yet: rows that ran are not copied again
            self._parts[:k] = [torch.cat([self._parts[0][start:], *self._parts[1:k]])]
            self._first, start = self.done, 0
        return self._parts[0][start : start + n]


@dataclass
class Row:
    """One row of a batch: ``item``'s next ``n`` positions."""

    item: Queued
    n: int

    @property
    def x(self) -> torch.Tensor:
        return self.item.rows(self.n)

    @property
    def last(self) -> bool:
        """This row runs the step's last positions (the last stage samples from it)."""
        return self.item.done + self.n == self.item.total


class StepQueue:
    """Steps admitted and not yet run, per stage, in arrival order; at most one per job and stage."""

    def __init__(self, *, chunk: int) -> None:
        self.chunk = max(1, chunk)
        self._by_stage: dict[StageId, dict[str, Queued]] = {}

    def __bool__(self) -> bool:
        return any(self._by_stage.values())

    def runnable(self) -> bool:
        """Whether any step has positions to run (a prompt whose next part has not arrived has none)."""
        return any(item.left > 0 for q in self._by_stage.values() for item in q.values())

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_stage.values())

    def stages(self) -> Iterator[StageId]:
        return iter([s for s, q in self._by_stage.items() if q])

    def has_job(self, job_id: str) -> bool:
        """Whether a step of ``job_id`` is queued at any stage."""
        return any(job_id in q for q in self._by_stage.values())

    def item(self, stage_id: StageId, job_id: str) -> Queued | None:
        return self._by_stage.get(stage_id, {}).get(job_id)

    def add(self, stage_id: StageId, step: StepPayload, x: torch.Tensor, total: int | None = None) -> None:
        """Queue ``step`` with its input ``x`` (``total`` positions in all: more than ``x`` holds when the
        rest of the prompt is still to arrive)."""
        total = int(x.shape[0]) if total is None else total
        self._by_stage.setdefault(stage_id, {})[step.job_id] = Queued(step, x, total)

    def drop_job(self, job_id: str) -> None:
        for q in self._by_stage.values():
            q.pop(job_id, None)

    def remove(self, stage_id: StageId, job_id: str) -> None:
        self._by_stage.get(stage_id, {}).pop(job_id, None)

    def decode_batch(self, stage_id: StageId, max_rows: int) -> list[Row]:
        """Up to ``max_rows`` one-position steps: jobs' last steps first (``last_step``), then the oldest."""
        q = self._by_stage.get(stage_id, {})
        rows = [Row(item, 1) for item in q.values() if item.total == 1 and item.left == 1]
        rows.sort(key=lambda r: not last_step(r.item.step))  # stable: arrival order within each kind
        return rows[: max(1, max_rows)]

    def prompt_jobs(self, stage_id: StageId) -> int:
        """How many prompts (steps of more than one position) wait here."""
        return sum(1 for item in self._by_stage.get(stage_id, {}).values() if item.total > 1)

    def prompt_batch(self, stage_id: StageId, besides: Sequence[Row] = (), *,
                     alone: bool = False) -> list[Row]:
        """The next chunk of the prompts waiting here: ``chunk`` positions in all (``ALONE_CHUNKS`` times that
        when ``alone``: no other job's step waits for the chunk), oldest prompt first, none of the steps
        ``besides`` holds (the decode batch of the same turn).

        A row is a contiguous piece of one prompt; rows of unequal length are padded to the longest in the
        batch, so a prompt that would only add a short tail beside a long chunk waits for the next turn."""
        q = self._by_stage.get(stage_id, {})
        taken = {id(r.item) for r in besides}
        rows: list[Row] = []
        budget = self.chunk * (ALONE_CHUNKS if alone else 1)
        for item in q.values():
            if item.total == 1 or item.left <= 0 or id(item) in taken:
                continue  # a one-position step (the decode batch's), one waiting for its next part, or taken
            if budget <= 0:
                break
            n = min(item.left, budget)
            if rows and n < rows[0].n // 2:
                break
            rows.append(Row(item, n))
            budget -= n
        return rows


# A prompt's chunk when no other job's step is in flight at the worker (nobody to hold up): this many
# chunks at once. Each chunk reads the stage's weights again; on an Intel Xeon (2026-12-01) a Qwen-shaped
# model's 2048-token prompt through its two stages took 16.6 s in chunks of 128, 14.3 in 256, 13.7-14.0 in
# 512-2048 (bench/long_prompt.py: TTFT 1.22x `generate` in chunks of 128). A job that arrives meanwhile
# waits for this bigger chunk at most.
ALONE_CHUNKS = 4

# How much padding a decode batch and a prompt chunk may add, run as one batch (rows are padded to the
# longest, so a one-token decode row beside a 16-token prompt costs 15 padded positions): at most this share
# of the positions they run. A pass over a CPU stage's weights costs about what a dozen prompt positions
# cost, and the jobs that merge save a pass on every later step, so a quarter is well worth it; beside a
# long prompt's chunk (decode rows padded to 128 positions each) they run apart.
MIX_PADDING = 0.25


def mixes_cheaply(decode: list[Row], prompt: list[Row]) -> bool:
    """Whether ``decode`` rows and a ``prompt`` chunk run as one batch (``MIX_PADDING``)."""
    if not decode or not prompt:
        return False
    rows = decode + prompt
    real = sum(r.n for r in rows)
    padded = len(rows) * max(r.n for r in rows)
    return padded - real <= MIX_PADDING * real


def last_step(step: StepPayload) -> bool:
    """Whether ``step`` is its job's last (its token is the ``max_tokens``-th): no later step of the job
    comes back round the route."""
    return step.step + 1 >= step.g.sampling.max_tokens


def micro_batch_rows(jobs_in_flight: int, route_hops: int, *, ending: int = 0) -> int:
    """How many decode steps a stage runs in one batch: about ``jobs_in_flight / route_hops``, so each of the
    route's stages has a batch to run while the others run theirs.

    ``ending`` of the jobs take their last step here (``decode_batch`` puts them first): they all ride in
    the batch. Split off, they would only cost passes over the weights: no later step of theirs comes round
    for another stage to run meanwhile. (bench/pipeline.py, P3 at 16 streams: the last 7 steps ran in
    batches of 4, 2 and 1 at the last stage, each pass as long as a batch of 8.)"""
    going_on = max(0, jobs_in_flight - ending)
    return max(1, ending + math.ceil(going_on / max(1, route_hops)))
