"""Where layers go and which workers a job runs through. Pure functions on plain data.

- ``find_routes``: complete chains (embeddings -> every layer -> head) over the stages live workers hold,
  fewest hops first.
- ``choose_route``: one of the fewest-hop chains, taken in turn, so jobs spread over spare copies.
- ``plan_loads``: when no chain is complete, load orders that finish one: the part no live worker
  holds is cut into contiguous layer groups on the workers with the most free memory (fewest hops that
  fit, groups balanced when several are needed), then spare copies while memory allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
                embeddings: bool) -> list[LoadOrder] | None:
    """Cover layers ``[first, L)`` + head (+ embeddings on the first group) on as few workers as fit."""
    ranked = sorted(workers, key=lambda w: (-w[1], w[0]))
    for k in range(1, len(ranked) + 1):
        plan = _try_k(shape, ranked[:k], first, embeddings=embeddings)
        if plan is not None:
            return plan
    return None


def _try_k(shape: ModelShape, chosen: list[tuple[str, int]], first: int, *,
           embeddings: bool) -> list[LoadOrder] | None:
    L = shape.num_layers
    orders: list[LoadOrder] = []
    start = first
    for i, (wid, free) in enumerate(chosen):
        emb = embeddings and i == 0
        left = len(chosen) - i
        if left == 1:
            if shape.bytes_for(start, L, embeddings=emb, head=True) > free:
                return None
            orders.append(LoadOrder(wid, shape.model_id, Span(start, L, emb, True)))
            return orders
        cap = _capacity(shape, free, start, embeddings=emb, upto=L)
        # Balanced groups: an even share of what is left, unless this worker can't hold that much.
        share = math.ceil((L - start) / left)
        n = min(cap, share)
        if n == 0:
            return None
        orders.append(LoadOrder(wid, shape.model_id, Span(start, start + n, emb, False)))
        start += n
    return None


def plan_loads(shape: ModelShape, workers: list[WorkerInfo], *, max_copies: int = 2) -> list[LoadOrder]:
    """Load orders that make the model servable (first copy), then spare copies while memory allows.

    Reuses the longest chain live workers already hold from the embeddings; plans only what is missing.
    Returns [] when a complete route already exists or nothing fits.
    """
    if find_routes(shape.model_id, shape.num_layers, workers):
        return []
    free = {w.worker_id: w.free_memory for w in workers}
    prefix = longest_prefix(shape.model_id, workers)
    start = prefix[-1].span.last if prefix else 0
    # A worker that appears in the prefix may still take more layers: what it has left is still free.
    first_copy = _plan_range(shape, list(free.items()), start, embeddings=not prefix)
    if first_copy is None:
        return []
    orders = list(first_copy)
    used = {o.worker_id for o in orders} | {h.worker_id for h in prefix}
    for _ in range(max_copies - 1):
        spare = [(wid, f) for wid, f in free.items() if wid not in used]
        copy = _plan_range(shape, spare, 0, embeddings=True)
        if copy is None:
            break
        orders += copy
        used |= {o.worker_id for o in copy}
    return orders


def needed_bytes(shape: ModelShape) -> int:
    return shape.bytes_for(0, shape.num_layers, embeddings=True, head=True)
