"""Live workers, from their heartbeats in Redis.

A worker writes its record (``azu:worker:<id>``, JSON) and its last heartbeat time (``azu:workers`` sorted
set) every few seconds. A worker whose heartbeat is older than ``ttl`` is not live: it gets no new routes
and no load orders. Nothing here needs the worker to say goodbye; a crash just stops the heartbeats.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

WORKERS_KEY = "azu:workers"  # zset worker_id -> last heartbeat (unix seconds)
DEFAULT_TTL_S = float(os.environ.get("AZU_HEARTBEAT_TTL_S") or 15.0)


def worker_key(worker_id: str) -> str:
    return f"azu:worker:{worker_id}"


@dataclass(frozen=True)
class HeldStage:
    """Layers ``[first, last)`` of ``model_id`` (plus embeddings / head) that a worker holds."""

    model_id: str
    first: int
    last: int
    embeddings: bool
    head: bool

    def covers(self, model_id: str, first: int, last: int, embeddings: bool, head: bool) -> bool:
        return (self.model_id, self.first, self.last, self.embeddings, self.head) == (
            model_id, first, last, embeddings, head)


@dataclass
class WorkerInfo:
    worker_id: str
    queue: str
    device: str  # GPU name, or "cpu"
    total_memory: int  # bytes the worker offers
    free_memory: int  # bytes still free for more layers
    p2p_url: str | None = None
    wallet: str | None = None
    stages: list[HeldStage] = field(default_factory=list)
    cached_jobs: int = 0  # jobs whose KV caches this worker holds now
    started_at: float = 0.0
    heartbeat_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        d: dict[str, Any] = json.loads(raw)
        d["stages"] = [HeldStage(**s) for s in d.get("stages", [])]
        return cls(**d)


def register(r: redis.Redis, info: WorkerInfo, *, now: float | None = None) -> None:
    """Write the worker's record and heartbeat (also what every heartbeat does)."""
    now = time.time() if now is None else now
    info.heartbeat_at = now
    pipe = r.pipeline()
    pipe.set(worker_key(info.worker_id), info.to_json())
    pipe.zadd(WORKERS_KEY, {info.worker_id: now})
    pipe.execute()


def deregister(r: redis.Redis, worker_id: str) -> None:
    pipe = r.pipeline()
    pipe.zrem(WORKERS_KEY, worker_id)
    pipe.delete(worker_key(worker_id))
    pipe.execute()


def live_workers(r: redis.Redis, *, ttl: float = DEFAULT_TTL_S, now: float | None = None) -> list[WorkerInfo]:
    """Workers whose last heartbeat is within ``ttl`` seconds, in worker-id order."""
    now = time.time() if now is None else now
    found: list[Any] = r.zrangebyscore(WORKERS_KEY, now - ttl, "+inf")  # type: ignore[assignment]
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in found]
    if not ids:
        return []
    raws = r.mget([worker_key(i) for i in ids])
    out = [WorkerInfo.from_json(raw) for raw in raws if raw]
    return sorted(out, key=lambda w: w.worker_id)


def get_worker(r: redis.Redis, worker_id: str) -> WorkerInfo | None:
    raw = r.get(worker_key(worker_id))
    return WorkerInfo.from_json(raw) if raw else None


def is_live(r: redis.Redis, worker_id: str, *, ttl: float = DEFAULT_TTL_S, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    score = r.zscore(WORKERS_KEY, worker_id)
    return score is not None and score >= now - ttl
