"""Where layers go and which workers a job runs through. Pure functions on plain data.

- ``find_routes``: complete chains (embeddings -> every layer -> head) over the stages live workers hold,
  fewest hops first.
- ``choose_route``: one of the fewest-hop chains, taken in turn, so jobs spread over spare copies.
- ``plan_loads``: load orders for what is missing: first what completes one chain (the layers no live
  worker holds, cut into contiguous groups on the workers with the most free memory: fewest hops that fit,
  groups balanced when several are needed), then spare copies up to N (``AZU_COPIES``) while memory
  allows. Held spans and orders in flight are reused, so after a loss or a restart only the lost span is
  loaded again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from azu.engine.span import Span
from azu.network.directory import WorkerInfo
from azu.network.wire import Hop

# Weights are not all a stage needs: activations and the KV cache of its jobs take room too.
MEMORY_HEADROOM = 1.25


@dataclass(frozen=True)
class ModelShape:
    model_id: str
    layer_bytes: tuple[int, ...]  # weight bytes of each decoder layer
    embeddings_bytes: int
    head_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    def bytes_for(self, first: int, last: int, *, embeddings: bool, head: bool) -> int:
        raw = sum(self.layer_bytes[first:last])
        raw += self.embeddings_bytes if embeddings else 0
        raw += self.head_bytes if head else 0
        return math.ceil(raw * MEMORY_HEADROOM)


@dataclass(frozen=True)
class LoadOrder:
    """Worker ``worker_id`` is to fetch and hold ``span`` of ``model_id``."""

    worker_id: str
    model_id: str
    span: Span

    def to_dict(self) -> dict[str, object]:
        return {"worker_id": self.worker_id, "model_id": self.model_id, "span": self.span.to_list()}


# --- routing over what workers hold -------------------------------------------------------------
def _held(model_id: str, workers: list[WorkerInfo]) -> list[tuple[str, Span]]:
    return [(w.worker_id, span) for w in workers for span in w.holds(model_id)]


def _chains(model_id: str, workers: list[WorkerInfo], *, max_hops: int = 16) -> list[list[Hop]]:
    """Every chain of held stages that starts with the embeddings at layer 0 (complete or not)."""
    held = _held(model_id, workers)
    out: list[list[Hop]] = []

    def extend(chain: list[Hop]) -> None:
        out.append(chain)
        if len(chain) >= max_hops or chain[-1].span.head:
            return
        nxt = chain[-1].span.last
        for wid, span in held:
            if span.first == nxt and not span.embeddings:
                extend([*chain, Hop(wid, span)])

    for wid, span in held:
        if span.embeddings:
            extend([Hop(wid, span)])
    return out


def find_routes(model_id: str, num_layers: int, workers: list[WorkerInfo]) -> list[list[Hop]]:
    """Complete routes over ``workers`` (only live ones should be passed), fewest hops first."""
    routes = [c for c in _chains(model_id, workers) if c[-1].span.head and c[-1].span.last == num_layers]
    return sorted(routes, key=lambda c: (len(c), [h.worker_id for h in c]))


def choose_route(routes: list[list[Hop]], turn: int) -> list[Hop] | None:
    """The ``turn``-th of the fewest-hop routes (round robin spreads jobs over copies)."""
    if not routes:
        return None
    fewest = len(routes[0])
    best = [r for r in routes if len(r) == fewest]
    return best[turn % len(best)]


def longest_prefix(model_id: str, workers: list[WorkerInfo]) -> list[Hop]:
    """The held chain from the embeddings that reaches furthest (no head), or []."""
    chains = [c for c in _chains(model_id, workers) if not c[-1].span.head]
    if not chains:
        return []
    return max(chains, key=lambda c: (c[-1].span.last, -len(c)))


# --- load orders --------------------------------------------------------------------------------
def _capacity(shape: ModelShape, free: int, first: int, *, embeddings: bool, upto: int) -> int:
    """How many layers from ``first`` (at most up to ``upto``) fit in ``free`` bytes (head not included)."""
    n = 0
    while first + n < upto and shape.bytes_for(first, first + n + 1, embeddings=embeddings,
                                               head=False) <= free:
        n += 1
    return n


def _plan_range(shape: ModelShape, workers: list[tuple[str, int]], first: int, *,
                embeddings: bool, upto: int | None = None) -> list[LoadOrder] | None:
    """Cover layers ``[first, upto)`` (default: to the last layer, with the head) (+ embeddings on the first
    group) on as few of ``workers`` as fit. The head goes with the range that ends at the last layer."""
    upto = shape.num_layers if upto is None else upto
    ranked = sorted(workers, key=lambda w: (-w[1], w[0]))
    for k in range(1, len(ranked) + 1):
        plan = _try_k(shape, ranked[:k], first, upto, embeddings=embeddings)
        if plan is not None:
            return plan
    return None


def _try_k(shape: ModelShape, chosen: list[tuple[str, int]], first: int, upto: int, *,
           embeddings: bool) -> list[LoadOrder] | None:
    head = upto == shape.num_layers
    orders: list[LoadOrder] = []
    start = first
    for i, (wid, free) in enumerate(chosen):
        emb = embeddings and i == 0
        left = len(chosen) - i
        if left == 1:
            if shape.bytes_for(start, upto, embeddings=emb, head=head) > free:
                return None
            orders.append(LoadOrder(wid, shape.model_id, Span(start, upto, emb, head)))
            return orders
        cap = _capacity(shape, free, start, embeddings=emb, upto=upto)
        # Balanced groups: an even share of the work left, unless this worker can't hold that much.
        share = _even_share(shape, start, upto, left, head=head)
        n = min(cap, share, upto - start - (left - 1))  # every later worker gets at least one layer
        if n <= 0:
            return None
        orders.append(LoadOrder(wid, shape.model_id, Span(start, start + n, emb, False)))
        start += n
    return None


def _even_share(shape: ModelShape, start: int, upto: int, groups: int, *, head: bool) -> int:
    """How many layers from ``start`` make one of ``groups`` even shares of the work in ``[start, upto)``.

    A decode step reads every weight of a group once, so a group's work is its weight bytes, with two
    corrections: the embeddings are a lookup (one row per token) and count for nothing, and the head (the
    hidden state times the whole vocabulary matrix) counts in full. The head is large: on Qwen2.5-0.5B's
    shape it is as much work as 9 of the 24 layers, so equal layer counts leave the head's worker the
    bottleneck of every pipelined batch (bench/pipeline.py, P3)."""
    target = (sum(shape.layer_bytes[start:upto]) + (shape.head_bytes if head else 0)) / groups
    best, best_gap, acc = 1, math.inf, 0
    for n in range(1, upto - start + 1):
        acc += shape.layer_bytes[start + n - 1]
        if abs(acc - target) <= best_gap:  # a tie goes to the larger share: earlier workers are roomier
            best, best_gap = n, abs(acc - target)
        elif acc > target:
            break
    return best


def even_spans(shape: ModelShape, groups: int) -> list[Span]:
    """The whole model cut into ``groups`` spans of even work (``_even_share``), memory not considered: the
    cut placement makes when that many workers are needed and each has room."""
    spans: list[Span] = []
    start = 0
    for left in range(groups, 0, -1):
        n = shape.num_layers - start if left == 1 else min(
            _even_share(shape, start, shape.num_layers, left, head=True), shape.num_layers - start - left + 1)
        spans.append(Span(start, start + n, start == 0, start + n == shape.num_layers))
        start += n
    return spans


def _first_copy_from_prefix(shape: ModelShape, workers: list[WorkerInfo]) -> list[LoadOrder] | None:
    """One complete copy: the longest held chain from the embeddings, then the rest on the roomiest workers
    (the plan of the first placement, before spare copies were kept)."""
    free = {w.worker_id: w.free_memory for w in workers}
    prefix = longest_prefix(shape.model_id, workers)
    start = prefix[-1].span.last if prefix else 0
    # A worker that appears in the prefix may still take more layers: what it has left is still free.
    return _plan_range(shape, list(free.items()), start, embeddings=not prefix)


def _deficits(counts: list[int], target: int) -> list[tuple[int, int]]:
    """The maximal runs of layers held fewer than ``target`` times, as [first, last) ranges."""
    out: list[tuple[int, int]] = []
    for i, n in enumerate(counts):
        if n >= target:
            continue
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _with(workers: list[WorkerInfo], orders: list[LoadOrder], shape: ModelShape) -> list[WorkerInfo]:
    """``workers`` as they will be once ``orders`` are loaded (the span held, its memory taken)."""
    by_id = {w.worker_id: replace(w, stages=list(w.stages)) for w in workers}
    for o in orders:
        w = by_id.get(o.worker_id)
        if w is None:
            continue
        w.stages.append((o.model_id, o.span))
        need = shape.bytes_for(o.span.first, o.span.last, embeddings=o.span.embeddings, head=o.span.head)
        w.free_memory = max(0, w.free_memory - need)
    return [by_id[k] for k in sorted(by_id)]


def plan_loads(shape: ModelShape, workers: list[WorkerInfo], *, max_copies: int = 2,
               pending: list[LoadOrder] | tuple[LoadOrder, ...] = ()) -> list[LoadOrder]:
    """Load orders that make the model servable, then keep ``max_copies`` copies of every layer while
    memory allows. Only what is missing is planned: spans live workers hold (and ``pending``, orders in
    flight) are reused, so a restarted worker that came back empty gets exactly the span it lost, and a
    route's surviving hops are kept.

    Copy by copy (1, then 2, ... ``max_copies``): the runs of layers held fewer times than that are each
    covered on the workers that hold none of their layers (so copies never share a worker), roomiest first,
    in as few groups as fit. The embeddings go with a run that starts at layer 0, the head with one that ends
    at the last layer. If the first copy cannot be completed that way (held spans that do not line up), a
    complete copy is planned from the longest held prefix instead. Returns [] when nothing is missing or
    nothing fits.
    """
    L = shape.num_layers
    sim = _with(workers, list(pending), shape)
    orders: list[LoadOrder] = []
    for target in range(1, max_copies + 1):
        counts = [0] * L
        holders: list[set[str]] = [set() for _ in range(L)]
        for w in sim:
            for span in w.holds(shape.model_id):
                for i in range(span.first, min(span.last, L)):
                    counts[i] += 1
                    holders[i].add(w.worker_id)
        planned: list[LoadOrder] = []
        for first, last in _deficits(counts, target):
            busy = set().union(*holders[first:last])
            room = [(w.worker_id, w.free_memory) for w in sim if w.worker_id not in busy]
            cover = _plan_range(shape, room, first, embeddings=first == 0, upto=last)
            if cover is None:
                planned = []
                break
            planned += cover
            sim = _with(sim, cover, shape)
        if target == 1 and not find_routes(shape.model_id, L, sim):
            # The held spans do not line up into a route: plan a complete copy the first way.
            sim = _with(workers, list(pending), shape)
            fallback = _first_copy_from_prefix(shape, sim)
            if fallback is None:
                return []
            planned = fallback
            sim = _with(sim, fallback, shape)
        if not planned and target > 1 and _deficits(counts, target):
            break  # no room for this spare copy: stop (the next copies need more room still)
        orders += planned
    return orders


def needed_bytes(shape: ModelShape) -> int:
    return shape.bytes_for(0, shape.num_layers, embeddings=True, head=True)
