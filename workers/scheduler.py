"""Scheduler tasks (queue ``core``). Thin: the work is azu.network.jobs.

- ``settle``: a job ended: charge its usage and credit its workers (or release the hold).
- ``watchdog`` (beat): fail jobs that stopped making progress, start jobs whose layers are now loaded.
- ``place``: make a model servable ahead of its first job (load orders on live workers).
"""

from __future__ import annotations

from functools import cache

import redis

from azu.config import redis_url
from azu.network import jobs
from workers import app


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(redis_url())


@app.task(name="workers.scheduler.settle", ignore_result=True, autoretry_for=(Exception,),
          retry_backoff=2, retry_backoff_max=300, max_retries=20)
def settle(*, job_id: str) -> str:
    """Settlement is idempotent per job (billing and the job's ``settled`` mark), so retries are safe."""
    from azu.billing.base import get_billing

    return jobs.settle(_redis(), job_id, billing=get_billing())


@app.task(name="workers.scheduler.watchdog", ignore_result=True)
def watchdog() -> list[str]:
    return jobs.watchdog(_redis())


@app.task(name="workers.scheduler.place", ignore_result=True)
def place(*, model_id: str) -> int:
    return len(jobs.ensure_placed(_redis(), model_id))
