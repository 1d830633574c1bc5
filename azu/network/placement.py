"""Where layers go and which workers a job runs through. Pure functions on plain data.

- ``Routes``: the complete chains (embeddings -> every layer -> head) over the stages live workers hold,
  walked rather than listed; ``pick`` takes one of the fewest-hop chains in turn, hop by hop, so jobs spread
  over spare copies (or, for a re-routed job, one of those that keep most of its old hops).
- ``find_routes``: the same chains listed, fewest hops first (for a few copies: there are copies ** spans).
- ``plan_loads``: load orders for what is missing: first what completes one chain (the layers no live
  worker holds, cut into contiguous groups on the workers with the most free memory: fewest hops that fit,
  groups balanced when several are needed), then spare copies up to N (``AZU_COPIES``) while memory
  allows. Held spans and orders in flight are reused, so after a loss or a restart only the lost span is
  loaded again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

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
MAX_HOPS = 16  # a route's hops at most (routes, prefixes, and so a copy's workers)


def _held(model_id: str, workers: list[WorkerInfo]) -> list[tuple[str, Span]]:
    """Each (worker, span) held, once (a record naming a span twice holds it once)."""
    return list(dict.fromkeys((w.worker_id, span) for w in workers for span in w.holds(model_id)))


def _chains(model_id: str, workers: list[WorkerInfo], *, max_hops: int = MAX_HOPS) -> list[list[Hop]]:
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


def _order(hop: Hop) -> tuple[str, int, int, bool, bool]:
    """How routes of equal length are ordered, hop by hop (``find_routes``; ``Routes.pick`` goes round the
    copies that can come next in this order)."""
    return hop.worker_id, hop.span.first, hop.span.last, hop.span.embeddings, hop.span.head


def find_routes(model_id: str, num_layers: int, workers: list[WorkerInfo]) -> list[list[Hop]]:
    """Complete routes over ``workers`` (only live ones should be passed), fewest hops first. Every route,
    listed: c copies of each of h spans make c ** h of them, so the core's own paths use ``Routes``."""
    routes = [c for c in _chains(model_id, workers) if c[-1].span.head and c[-1].span.last == num_layers]
    return sorted(routes, key=lambda c: (len(c), [_order(h) for h in c]))


_Value = tuple[int, int]  # (hops, -hops kept) of a complete route, or of its rest from a hop: least is best


class Routes:
    """The complete routes over the stages ``workers`` hold, walked over layer boundaries instead of listed:
    a model held in 500 copies of each half has 250,000 routes, and listing them made one submit take 0.75 s
    (``bench/submit.py``). Work here is (held stages) x (hops), whatever the number of routes.

    ``pick(turn)`` takes one of the fewest-hop routes; with ``keep`` (a re-routed job's old hops), one of
    the fewest-hop routes that keep the most of them. Hop by hop it takes the ``turn``-th (round) of the
    copies that can come next, so consecutive jobs go round the copies of every hop (taking the listing's
    routes in order had kept 500 jobs in a row on one first hop).
    ``avoid``: workers no route may use (the ones just lost)."""

    def __init__(self, model_id: str, num_layers: int, workers: list[WorkerInfo], *, max_hops: int = MAX_HOPS,
                 avoid: frozenset[str] | set[str] = frozenset()) -> None:
        self.num_layers, self.max_hops = num_layers, max_hops
        live = [w for w in workers if w.worker_id not in avoid]
        held = sorted((Hop(worker_id, span) for worker_id, span in _held(model_id, live)), key=_order)
        self.starts = [h for h in held if h.span.embeddings]
        self.after: dict[int, list[Hop]] = {}  # layer boundary -> the held stages (no embeddings) from it
        for h in held:
            if not h.span.embeddings:
                self.after.setdefault(h.span.first, []).append(h)
        self._plain: dict[Any, _Value | None] = {}  # what the walk found with nothing to keep, for next time

    def exists(self) -> bool:
        return self._best(self.starts, 0, frozenset(), self._plain) is not None

    def pick(self, turn: int, *, keep: Sequence[Hop] = ()) -> list[Hop] | None:
        kept = frozenset(keep)
        memo = self._plain if not kept else {}
        value = self._best(self.starts, 0, kept, memo)
        route: list[Hop] = []
        hops, depth = self.starts, 0
        while value is not None:
            best = [h for h in hops if self._rest(h, depth, kept, memo) == value]
            hop = best[turn % len(best)]
            route.append(hop)
            if hop.span.head:
                return route
            value = (value[0] - 1, value[1] + (hop in kept))
            hops, depth = self.after.get(hop.span.last, []), depth + 1
        return None

    def _rest(self, hop: Hop, depth: int, kept: frozenset[Hop],
              memo: dict[Any, _Value | None]) -> _Value | None:
        """The best complete route from ``hop`` on (``hop`` the ``depth``-th of its route), if any."""
        if hop.span.head:
            return (1, -(hop in kept)) if hop.span.last == self.num_layers else None
        if depth + 1 >= self.max_hops:
            return None
        rest = self._best(self.after.get(hop.span.last, []), depth + 1, kept, memo)
        return None if rest is None else (rest[0] + 1, rest[1] - (hop in kept))

    def _best(self, hops: list[Hop], depth: int, kept: frozenset[Hop],
              memo: dict[Any, _Value | None]) -> _Value | None:
        key = (hops[0].span.first if hops else -1, hops is self.starts, depth)
        if key not in memo:
            found = [v for v in (self._rest(h, depth, kept, memo) for h in hops) if v is not None]
            memo[key] = min(found, default=None)
        return memo[key]


def fewest_copies(model_id: str, num_layers: int, workers: list[WorkerInfo]) -> int:
    """How many times the least held layer of the model is held by ``workers`` (0: some layer by none)."""
    counts = [0] * num_layers
    for _wid, span in _held(model_id, workers):
        for i in range(span.first, min(span.last, num_layers)):
            counts[i] += 1
    return min(counts, default=0)


def longest_prefix(model_id: str, workers: list[WorkerInfo], *, max_hops: int = MAX_HOPS) -> list[Hop]:
    """The held chain from the embeddings that reaches furthest without the head (of those, one with the
    fewest hops), or []. Walked over layer boundaries, nearest first, not listed: c copies of each of h spans
    make c ** h chains (a model with no head held, say, and hundreds of copies of the rest)."""
    starts: list[Hop] = []
    after: dict[int, list[Hop]] = {}
    for wid, span in _held(model_id, workers):
        if span.head:
            continue
        if span.embeddings:
            starts.append(Hop(wid, span))
        else:
            after.setdefault(span.first, []).append(Hop(wid, span))
    reached: dict[int, list[Hop]] = {}  # layer boundary -> a fewest-hop chain ending there
    frontier = []
    for hop in starts:
        if hop.span.last not in reached:
            reached[hop.span.last] = [hop]
            frontier.append(hop.span.last)
    for _ in range(max_hops - 1):
        nearer, frontier = frontier, []
        for boundary in nearer:
            for hop in after.get(boundary, []):
                if hop.span.last not in reached:
                    reached[hop.span.last] = [*reached[boundary], hop]
                    frontier.append(hop.span.last)
    return reached[max(reached)] if reached else []


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
        if target == 1 and not Routes(shape.model_id, L, sim).exists():
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
