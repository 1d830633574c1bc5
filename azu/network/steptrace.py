"""Where a step's time goes between workers: optional timestamps of the points a worker's steps pass.

With ``AZU_STEP_TRACE=<folder>`` a worker notes the monotonic time at each point of ``POINTS`` on the thread
that runs its steps, and writes them to ``<folder>/<worker id>.trace`` as text lines ``<point> <ns>``, each
time the session turns idle and when the worker stops (not on a step's path, unless a session stays busy for
``FLUSH_AT`` marks). Nothing but point names and
times: no job ids, no payloads. Off (the default), a mark costs one test.

``CLOCK_MONOTONIC`` is one clock for every process of a machine, so the traces of workers on one machine
line up: ``read`` merges them, ``step_path`` follows a step around the ring of workers and gives the median
time of each leg (``python bench/pipeline.py --rows p2 --trace`` prints it). On two shared cores a step of
P2's tiny model spent about half its time outside the forwards (2026-12-03): that table says where.
"""

from __future__ import annotations

import collections
import itertools
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# A step's points at one worker, in the order it passes them.
POINTS = (
    "taken",  # its bundle taken from the inbox (or the direct path's frames)
    "verified",  # the bundle's signature checked (its grants' too, the first time each is seen)
    "admitted",  # every bundle of the take admitted
    "queued",  # its input unpacked and queued for a batch
    "forward",  # the stage's forward starts
    "forwarded",  # ... and ends
    "handing",  # the outputs packed (at the last stage: sampled, and the tokens' reports signed)
    "sending",  # the bundles signed (and sent, where they go by the direct path): on to the outbox
    "sent",  # the outbox has sent it (in place) or queued it (on its thread)
)

log = logging.getLogger(__name__)

FLUSH_AT = 1 << 16  # marks held before a write even without an idle moment (a long busy session)


class StepTrace:
    """A worker's marks, held in memory and appended to its file at ``flush``."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._marks: list[tuple[str, int]] | None = [] if self.path else None

    @classmethod
    def in_folder(cls, folder: str | Path | None, worker_id: str) -> StepTrace:
        return cls(Path(folder) / f"{worker_id}.trace" if folder else None)

    def mark(self, point: str) -> None:
        if self._marks is None:
            return
        self._marks.append((point, time.monotonic_ns()))
        if len(self._marks) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Append the marks held to the file. A trace must never fail a worker: if it cannot be written, it
        says so once and stops noting."""
        if not self._marks or self.path is None:
            return
        marks, self._marks = self._marks, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="ascii") as f:
                f.writelines(f"{point} {ns}\n" for point, ns in marks)
        except OSError as exc:
            log.warning("step trace %s cannot be written (%s): tracing stops; check AZU_STEP_TRACE",
                        self.path, exc)
            self._marks = None


@dataclass(frozen=True)
class Mark:
    ns: int
    worker: str
    point: str

    @property
    def label(self) -> str:
        return f"{self.worker} {self.point}"


def read(folder: str | Path, *, since_ns: int = 0, until_ns: int | None = None) -> list[Mark]:
    """Every worker's marks in ``folder`` between the two times, merged in time order."""
    marks = []
    for path in sorted(Path(folder).glob("*.trace")):
        for line in path.read_text(encoding="ascii").splitlines():
            point, _, ns = line.partition(" ")
            t = int(ns)
            if since_ns <= t and (until_ns is None or t <= until_ns):
                marks.append(Mark(t, path.stem, point))
    marks.sort(key=lambda m: m.ns)
    return marks


@dataclass(frozen=True)
class Leg:
    start: str  # "<worker> <point>"
    end: str
    median_ms: float
    share: float  # of the times ``start`` was marked, how often ``end`` came next


def step_path(marks: list[Mark], start: str) -> list[Leg]:
    """The legs of a step from mark ``start`` (say ``"a taken"``) around the ring back to it: from each
    mark, the mark that most often came next on any worker, with the median time between them. The merged
    order is the machine's: a leg's time is what passed, whichever process ran meanwhile, so the legs of a
    step add up to its time. Empty if ``start`` was never marked."""
    following: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for before, after in itertools.pairwise(marks):
        following[before.label][after.label] += 1
        gaps[before.label, after.label].append((after.ns - before.ns) / 1e6)
    legs: list[Leg] = []
    here, seen = start, set()
    while following.get(here) and here not in seen:
        seen.add(here)
        nxt, count = following[here].most_common(1)[0]
        legs.append(Leg(here, nxt, statistics.median(gaps[here, nxt]), count / sum(following[here].values())))
        here = nxt  # back at ``start``, or at a mark seen before: the loop ends (``seen``)
    return legs
