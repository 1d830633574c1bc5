"""The job watchdog (a beat task on the scheduler): no job waits forever.

Each tick it fails running jobs that made no progress within the step deadline (``AZU_STEP_DEADLINE_S``),
naming the route's workers that stopped heartbeating, and jobs still waiting for their layers after the load
deadline (``AZU_LOAD_DEADLINE_S``); it also retries starting each model's waiting jobs once, in case a load
finished while nobody was looking. Deadlines are read from the settings at each tick.
"""

from __future__ import annotations

import json
import time

import redis

from azu import metrics
from azu.config import get_settings
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
