"""What a worker keeps so it can prove what it was given: the signed step bundles it received from the hop
before it, per job, for a while.

A bundle is signed by its sender over all of its bytes (``StepBundle``), so only the whole bundle proves what
the sender sent; a bundle that carried steps of several jobs is kept once and named by each of them. When the
verifier finds a stage's output wrong, it asks that stage for these bundles (an ``evidence`` order, signed by
the core): with them it re-computes the stage from the input the stage really had, which tells a stage that
computed wrong from one that was handed wrong numbers (docs/security.md, "Verified work").

Bounded by bytes and age (``AZU_EVIDENCE_BYTES``, ``AZU_EVIDENCE_S``): the oldest bundles go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict


class EvidenceStore:
    def __init__(self, *, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.bytes = 0
        # bundle id -> (when, blob, job keys naming it), oldest first
        self._bundles: OrderedDict[int, tuple[float, bytes, set[tuple[str, int]]]] = OrderedDict()
        self._by_job: dict[tuple[str, int], list[int]] = defaultdict(list)
        self._next = 0

    def add(self, blob: bytes, jobs: set[tuple[str, int]], *, now: float | None = None) -> None:
        """Keep ``blob`` for each ``(job id, epoch)`` in ``jobs``."""
        if not jobs or len(blob) > self.max_bytes:
            return
        now = time.monotonic() if now is None else now
        self._next += 1
        self._bundles[self._next] = (now, blob, set(jobs))
        for job in jobs:
            self._by_job[job].append(self._next)
        self.bytes += len(blob)
        self._evict(now)

    def take(self, job_id: str, epoch: int, *, now: float | None = None) -> list[bytes]:
        """The bundles kept for the job's epoch, in the order they arrived (they stay kept)."""
        self._evict(time.monotonic() if now is None else now)
        return [self._bundles[i][1] for i in self._by_job.get((job_id, epoch), []) if i in self._bundles]

    def _evict(self, now: float) -> None:
        while self._bundles:
            bundle_id, (when, blob, jobs) = next(iter(self._bundles.items()))
            if self.bytes <= self.max_bytes and now - when <= self.max_age_s:
                return
            del self._bundles[bundle_id]
            self.bytes -= len(blob)
            for job in jobs:
                ids = self._by_job.get(job)
                if ids is not None:
                    ids[:] = [i for i in ids if i != bundle_id]
                    if not ids:
                        del self._by_job[job]
