"""Live workers, from their heartbeats in Redis.

The collector (a core process) writes a worker's record (``azu:worker:<id>``, JSON) and its last heartbeat
time (``azu:workers`` sorted set) from the worker's signed heartbeat report, every few seconds; the worker
itself writes neither. Only spans the core ordered the worker to load (``azu:assigned:<id>``) count as held.
A worker whose heartbeat is older than the heartbeat TTL (``AZU_HEARTBEAT_TTL_S``) is
not live: it gets no new routes and no load orders. Nothing here needs the worker to say goodbye; a crash
just stops the heartbeats.

A worker the core found silent on a running job's route (azu.network.watchdog.recover_lost) is marked
*lost* (``azu:lost``, a sorted set: worker id -> when) and is not live from that moment, whatever its last
heartbeat says, until a heartbeat from a process started after the mark (a restart) or ``LOST_HOLD_S``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from azu.config import get_settings
from azu.engine.span import Span
from azu.errors import InvalidRequest, shown
from azu.network import keys


@dataclass
class WorkerInfo:
    worker_id: str
    queue: str
    device: str  # GPU name, or "cpu"
    total_memory: int  # bytes the worker offers
    free_memory: int  # bytes still free for more layers
    p2p_url: str | None = None
    wallet: str | None = None
    stages: list[tuple[str, Span]] = field(default_factory=list)  # (model id, span) of each held stage
    cached_jobs: int = 0  # jobs whose KV caches this worker holds now
    started_at: float = 0.0
    heartbeat_at: float = 0.0

    def holds(self, model_id: str) -> list[Span]:
        return [span for m, span in self.stages if m == model_id]

    def to_json(self) -> str:
        d = asdict(self)
        d["stages"] = [[model_id, *span.to_list()] for model_id, span in self.stages]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        d: dict[str, Any] = json.loads(raw)
        stages = []
        for s in d.get("stages", []):
            if not isinstance(s, list) or not s or not isinstance(s[0], str):
                raise InvalidRequest(f"malformed held stage {shown(s)} in a worker record")
            stages.append((s[0], Span.from_list(s[1:])))
        d["stages"] = stages
        return cls(**d)


LOST = keys.LOST_WORKERS  # core-owned: workers marked lost (see the module docstring)
LOST_HOLD_S = 600.0  # a lost mark not cleared by a restart lapses after this long


def mark_lost(r: redis.Redis, worker_ids: list[str] | set[str], *, now: float | None = None) -> None:
    """The core found these workers silent on a job's route: no new routes for them from now on."""
    if not worker_ids:
        return
    now = time.time() if now is None else now
    pipe = r.pipeline()
    pipe.zadd(LOST, {w: now for w in worker_ids})
    pipe.zremrangebyscore(LOST, "-inf", now - LOST_HOLD_S)
    pipe.execute()


def lost_workers(r: redis.Redis, *, now: float | None = None) -> set[str]:
    found: list[Any] = _read_lost(r, time.time() if now is None else now)
    return {keys.as_str(w) for w in found}


def _read_lost(reader: Any, now: float) -> Any:
    """Ask ``reader`` (a client, or a pipeline to answer later) for the workers whose lost mark stands."""
    return reader.zrangebyscore(LOST, now - LOST_HOLD_S, "+inf")


def _ttl(ttl: float | None) -> float:
    return get_settings().heartbeat_ttl_s if ttl is None else ttl


def register(r: redis.Redis, info: WorkerInfo, *, now: float | None = None) -> None:
    """Write the worker's record and heartbeat (also what every heartbeat does)."""
    now = time.time() if now is None else now
    info.heartbeat_at = now
    marked = r.zscore(LOST, info.worker_id)
    before = r.get(keys.worker(info.worker_id)) if marked is not None else None
    pipe = r.pipeline()
    pipe.set(keys.worker(info.worker_id), info.to_json())
    pipe.zadd(keys.WORKERS, {info.worker_id: now})
    # A new process under that id is not lost any more: one started after the mark, or one other than the
    # process the record showed (a supervisor may have started it before the core found the old one silent).
    if marked is not None and (info.started_at > marked or (
            before and float(json.loads(before).get("started_at") or 0.0) != info.started_at)):
        pipe.zrem(LOST, info.worker_id)
    pipe.execute()


def deregister(r: redis.Redis, worker_id: str) -> None:
    pipe = r.pipeline()
    pipe.zrem(keys.WORKERS, worker_id)
    pipe.delete(keys.worker(worker_id))
    pipe.execute()


def live_workers(r: redis.Redis, *, ttl: float | None = None, now: float | None = None) -> list[WorkerInfo]:
    """Workers whose last heartbeat is within ``ttl`` seconds (default: the heartbeat TTL), by worker id."""
    now = time.time() if now is None else now
    pipe = r.pipeline(transaction=False)  # one round trip (every job's submit reads the directory)
    pipe.zrangebyscore(keys.WORKERS, now - _ttl(ttl), "+inf")
    _read_lost(pipe, now)
    pipe.hkeys(keys.BANNED)
    found, lost_ids, banned = pipe.execute()
    # Lost workers until they restart; banned ones (failed verification, azu.verification) for good.
    lost = {keys.as_str(w) for w in (*lost_ids, *banned)}
    ids = [i for i in (keys.as_str(i) for i in found) if i not in lost]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    pipe.mget([keys.worker(i) for i in ids])
    for i in ids:
        pipe.smembers(keys.assigned(i))
    raws, *ordered = pipe.execute()
    out = []
    for raw, spans in zip(raws, ordered, strict=True):
        if not raw:
            continue
        info = WorkerInfo.from_json(raw)
        # Held only if the core ordered it (a record claiming more is not believed).
        allowed = {keys.as_str(s) for s in spans}
        info.stages = [(m, span) for m, span in info.stages
                       if json.dumps([m, *span.to_list()]) in allowed]
        out.append(info)
    return sorted(out, key=lambda w: w.worker_id)


def get_worker(r: redis.Redis, worker_id: str) -> WorkerInfo | None:
    raw = r.get(keys.worker(worker_id))
    return WorkerInfo.from_json(raw) if raw else None


def is_live(r: redis.Redis, worker_id: str, *, ttl: float | None = None, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    score = r.zscore(keys.WORKERS, worker_id)
    return score is not None and score >= now - _ttl(ttl) and worker_id not in lost_workers(r, now=now)
