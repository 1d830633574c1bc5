"""The job watchdog (a beat task on the scheduler): no job waits forever.

Each tick it fails running jobs that made no progress within the step deadline (``AZU_STEP_DEADLINE_S``),
naming the route's workers that stopped heartbeating, and jobs still waiting for their layers after the load
deadline (``AZU_LOAD_DEADLINE_S``); it also retries starting each model's waiting jobs once, in case a load
finished while nobody was looking. Deadlines are read from the settings at each tick.

``recover_lost`` is the fast half, run by the collector's loop about once a second (the collector is always
running, under its lease, and is the one writer of a job's steps, so re-routing there cannot race a token
being published; a beat task ticks every ``AZU_WATCHDOG_INTERVAL_S`` at best). A running job whose next token
has not come within the step timeout, on a route where a worker has not heartbeated within that timeout
either, has lost that worker: the worker is marked lost (no new routes, at once) and the job is re-routed
(azu.network.jobs.reroute_job). A job that is slow while all its workers heartbeat is left to ``tick``.
"""

from __future__ import annotations

import json
import time

import redis

from azu import metrics
from azu.config import Settings, get_settings
from azu.network import directory, jobs, keys
from azu.network.dispatch import Dispatcher
from azu.network.wire import route_from_list


def tick(r: redis.Redis, *, now: float | None = None, step_deadline_s: float | None = None,
         load_deadline_s: float | None = None, dispatch: Dispatcher | None = None) -> list[str]:
    """Fail jobs that made no progress within their deadline; retry waiting ones. Returns failed ids."""
    settings = get_settings()
    step_deadline_s = settings.step_deadline_s if step_deadline_s is None else step_deadline_s
    load_deadline_s = settings.load_deadline_s if load_deadline_s is None else load_deadline_s
    now = time.time() if now is None else now
    failed: list[str] = []
    retried: set[str] = set()  # models whose waiting jobs were retried this tick (it starts them all)
    for raw in r.zrange(keys.ACTIVE_JOBS, 0, -1):
        job_id = keys.as_str(raw)
        job = jobs.job_fields(r.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
        if not job:
            r.zrem(keys.ACTIVE_JOBS, job_id)
            continue
        status = job.get("status")
        idle = now - float(job.get("updated") or 0.0)
        if status == "queued":
            if job["model_id"] not in retried:
                retried.add(job["model_id"])
                jobs.start_waiting_jobs(r, job["model_id"], dispatch=dispatch)
                metrics.CORE_WATCHDOG.inc(r, action="retry_waiting")
            if idle > load_deadline_s and keys.as_str(r.hget(keys.job(job_id), "status") or b"") == "queued":
                r.zrem(keys.waiting(job["model_id"]), job_id)
                reason = f"no worker could load {job['model_id']} within {load_deadline_s:.0f}s"
                if jobs.fail_job(r, job_id, reason, dispatch=dispatch):
                    failed.append(job_id)
                    metrics.CORE_WATCHDOG.inc(r, action="fail_load_timeout")
        elif status == "running" and idle > step_deadline_s:
            route = route_from_list(json.loads(job.get("route") or "[]")) if job.get("route") else ()
            dead = [h.worker_id for h in route if not directory.is_live(r, h.worker_id, now=now)]
            why = f"; worker(s) {', '.join(dead)} stopped heartbeating" if dead else ""
            reason = f"stalled: no progress for {idle:.0f}s at step {job.get('step', '?')}{why}"
            if jobs.fail_job(r, job_id, reason, dispatch=dispatch):
                failed.append(job_id)
                metrics.CORE_WATCHDOG.inc(r, action="fail_stalled")
    return failed


STEP_TIMEOUT_MIN_S = 2.0
STEP_TIMEOUT_HEARTBEATS = 4


def step_timeout_s(settings: Settings | None = None) -> float:
    """How long a running job may wait for its next token before its silent workers count as lost: four
    heartbeat intervals (``AZU_HEARTBEAT_S``), at least 2 s. A worker is only found lost when its heartbeats
    have stopped for as long, so the bound follows the heartbeat rate: 12 s at the default 3 s beat, 2 s at
    the tests' 0.5 s. ``AZU_STEP_TIMEOUT_S`` sets it outright."""
    settings = settings or get_settings()
    if settings.step_timeout_s is not None:  # AZU_STEP_TIMEOUT_S: the operator's own bound
        return settings.step_timeout_s
    return max(STEP_TIMEOUT_MIN_S, STEP_TIMEOUT_HEARTBEATS * settings.worker.heartbeat_s)


def recover_lost(r: redis.Redis, *, now: float | None = None, timeout_s: float | None = None,
                 dispatch: Dispatcher | None = None) -> list[str]:
    """Re-route the running jobs that lost a worker (see the module docstring). Returns their ids."""
    now = time.time() if now is None else now
    timeout_s = step_timeout_s() if timeout_s is None else timeout_s
    ids = [keys.as_str(raw) for raw in r.zrange(keys.ACTIVE_JOBS, 0, -1)]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "status", "updated", "route")
    stalled: list[tuple[str, list[str]]] = []
    for job_id, (status, updated, route) in zip(ids, pipe.execute(), strict=True):
        if keys.as_str(status or b"") != "running" or not route:
            continue
        if now - float(keys.as_str(updated or b"0")) <= timeout_s:
            continue
        stalled.append((job_id, sorted({h.worker_id for h in route_from_list(json.loads(route))})))
    if not stalled:
        return []
    workers = sorted({w for _, ws in stalled for w in ws})
    pipe = r.pipeline(transaction=False)
    for w in workers:
        pipe.zscore(keys.WORKERS, w)
    beats = dict(zip(workers, pipe.execute(), strict=True))
    already = directory.lost_workers(r, now=now)
    silent = {w for w in workers if w in already or beats[w] is None or now - float(beats[w]) > timeout_s}
    directory.mark_lost(r, silent - already, now=now)
    rerouted = []
    for job_id, ws in stalled:
        lost = [w for w in ws if w in silent]
        if lost and jobs.reroute_job(r, job_id, lost, dispatch=dispatch, now=now):
            rerouted.append(job_id)
            metrics.CORE_WATCHDOG.inc(r, action="reroute")
    return rerouted
