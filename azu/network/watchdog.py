"""The job watchdog (a beat task on the scheduler): no job waits forever.

Each tick it fails running jobs that made no progress within the step deadline (``AZU_STEP_DEADLINE_S``),
naming the route's workers that stopped heartbeating, and jobs still waiting for their layers after the load
deadline (``AZU_LOAD_DEADLINE_S``); it also retries starting each model's waiting jobs once, in case a load
finished while nobody was looking. Deadlines are read from the settings at each tick.

``recover_lost`` is the fast half, run by the collector's loop about once a second (the collector is always
running, under its lease, and is the one writer of a job's steps, so re-routing there cannot race a token
being published; a beat task ticks every ``AZU_WATCHDOG_INTERVAL_S`` at best). A running job whose next token
has not come within the step timeout, on a route where a worker has not heartbeated within that timeout
either (or heartbeats from a process started after the job's last token: a restart, its caches gone), has
lost that worker: a silent worker is marked lost (no new routes, at once) and the job is re-routed
(azu.network.jobs.reroute_job: to a spare copy, or it waits while the lost span is loaded on a worker with
room). A job silent for ``STALL_REPLAY_FACTOR`` step timeouts while all its workers heartbeat has lost a
step, not a worker (a Redis restart loses up to a second of hand-overs): it is replayed on the same route,
twice at most; after that it is slow, and left to ``tick``.

Both also keep the network whole (every ``KEEP_EVERY_S`` from the collector's loop): worker broker logins a
restarted Redis lost are re-created from the core's record (azu.network.enrollment.restore_broker_logins),
and every model the core placed, or that lost a worker, is kept servable with ``AZU_COPIES`` copies while
capacity allows (azu.network.jobs.keep_placed): a worker that restarted empty is given its span again and a
lost copy is rebuilt.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from azu import metrics
from azu.config import Settings, get_settings
from azu.network import directory, enrollment, jobs, keys
from azu.network.dispatch import Dispatcher
from azu.network.wire import route_from_list

log = logging.getLogger(__name__)


def tick(r: redis.Redis, *, now: float | None = None, step_deadline_s: float | None = None,
         load_deadline_s: float | None = None, dispatch: Dispatcher | None = None) -> list[str]:
    """Fail jobs that made no progress within their deadline; retry waiting ones. Returns failed ids."""
    settings = get_settings()
    step_deadline_s = settings.step_deadline_s if step_deadline_s is None else step_deadline_s
    load_deadline_s = settings.load_deadline_s if load_deadline_s is None else load_deadline_s
    now = time.time() if now is None else now
    failed: list[str] = []
    _keep(r, dispatch=dispatch, force=True)
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
    _keep(r, dispatch=dispatch)
    ids = [keys.as_str(raw) for raw in r.zrange(keys.ACTIVE_JOBS, 0, -1)]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "status", "updated", "route", "resume", "model_id")
    stalled: list[tuple[str, float, list[str]]] = []
    deadline = get_settings().step_deadline_s
    for job_id, (status, updated, route, resume, model) in zip(ids, pipe.execute(), strict=True):
        since = float(keys.as_str(updated or b"0"))
        if (resume and keys.as_str(status or b"") == "queued" and now - since > deadline
                and not r.exists(keys.loading(keys.as_str(model or b"")))):
            _give_up(r, job_id, keys.as_str(model or b""), deadline, dispatch=dispatch)
            continue
        if keys.as_str(status or b"") != "running" or not route:
            continue
        if now - since <= timeout_s:
            continue
        stalled.append((job_id, since, sorted({h.worker_id for h in route_from_list(json.loads(route))})))
    if not stalled:
        return []
    workers = sorted({w for _, _, ws in stalled for w in ws})
    pipe = r.pipeline(transaction=False)
    for w in workers:
        pipe.zscore(keys.WORKERS, w)
    pipe.mget([keys.worker(w) for w in workers])
    *scores, records = pipe.execute()
    beats = dict(zip(workers, scores, strict=True))
    # When each worker's current process started: one restarted since a job's last token (a supervisor
    # brings a killed worker back within seconds, so it heartbeats again before the step timeout) holds
    # none of that job's caches, and is as lost to the job as a silent one.
    started = {w: float(json.loads(raw).get("started_at") or 0.0) if raw else 0.0
               for w, raw in zip(workers, records, strict=True)}
    already = directory.lost_workers(r, now=now)
    silent = {w for w in workers if w in already or beats[w] is None or now - float(beats[w]) > timeout_s}
    directory.mark_lost(r, silent - already, now=now)
    _keep_models_of(r, silent - already)
    rerouted = []
    for job_id, since, ws in stalled:
        lost = [w for w in ws if w in silent or started[w] > since]
        if lost and jobs.reroute_job(r, job_id, lost, dispatch=dispatch, now=now):
            rerouted.append(job_id)
            metrics.CORE_WATCHDOG.inc(r, action="reroute")
        elif not lost and now - since > STALL_REPLAY_FACTOR * timeout_s and _stall_replays(r, job_id) < \
                MAX_STALL_REPLAYS:
            # Every worker is there, yet the step is gone (a Redis restart lost the last second of
            # hand-overs, say): the same route, a new epoch, the prefix replayed. A wake mark the AOF brought
            # back from before the restart would make the replay wait in an inbox nobody is taking: clear it,
            # so the replay wakes its worker (an extra wake-up of a worker that is awake costs nothing).
            r.delete(*[keys.wake(w) for w in ws])
            if jobs.reroute_job(r, job_id, [], dispatch=dispatch, now=now):
                rerouted.append(job_id)
                metrics.CORE_WATCHDOG.inc(r, action="replay_stalled")
    return rerouted


def _give_up(r: redis.Redis, job_id: str, model_id: str, deadline: float, *,
             dispatch: Dispatcher | None) -> None:
    """A job that lost a worker waited the step deadline and no live worker could take the lost layers."""
    if not r.zrem(keys.waiting(model_id), job_id):
        return  # started meanwhile
    history = json.loads(keys.as_str(r.hget(keys.job(job_id), "reroutes") or b"[]"))
    last = history[-1] if history else {}
    reason = jobs.lost_reason(last.get("lost") or [], int(last.get("step") or 0), model_id)
    if jobs.fail_job(r, job_id, f"{reason} within {deadline:.0f}s", dispatch=dispatch):
        metrics.CORE_WATCHDOG.inc(r, action="fail_lost")


STALL_REPLAY_FACTOR = 3  # a job silent this many step timeouts with all its workers live is replayed
MAX_STALL_REPLAYS = 2  # ... at most this often (then it is left to the step deadline: it is just slow)


def _stall_replays(r: redis.Redis, job_id: str) -> int:
    history = json.loads(keys.as_str(r.hget(keys.job(job_id), "reroutes") or b"[]"))
    return sum(1 for x in history if not x.get("lost"))


KEEP_EVERY_S = 2.0  # how often the collector's loop checks the placement (each check reads the directory)
_kept_at = 0.0


def _keep(r: redis.Redis, *, dispatch: Dispatcher | None, force: bool = False) -> None:
    """azu.network.jobs.keep_placed, at most every ``KEEP_EVERY_S`` in this process (or now: ``force``)."""
    global _kept_at
    if not force and time.monotonic() - _kept_at < KEEP_EVERY_S:
        return
    _kept_at = time.monotonic()
    try:
        enrollment.restore_broker_logins(r)  # after a Redis restart: the workers' logins come back first
        jobs.keep_placed(r, dispatch=dispatch)
    except redis.ConnectionError:
        raise
    except Exception:  # placement trouble must not stop the re-routing of lost jobs
        log.exception("keeping the placement failed")


def _keep_models_of(r: redis.Redis, worker_ids: set[str]) -> None:
    """The models the lost workers held are kept at their copies from now on (their lost copies rebuilt)."""
    for w in sorted(worker_ids):
        info = directory.get_worker(r, w)
        for model_id in {m for m, _span in (info.stages if info else [])}:
            r.hsetnx(keys.model(model_id), jobs.PLACED, str(get_settings().copies))
