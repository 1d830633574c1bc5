"""Scheduler tasks (queue ``core``). Thin: the work is azu.network.jobs and azu.network.watchdog.

- ``settle``: a job ended: bill it (charge its usage and credit its workers, or release the hold).
- ``watchdog`` (beat): fail jobs that stopped making progress, start jobs whose layers are now loaded.
- ``place``: make a model servable ahead of its first job (load orders on live workers).
- ``reconcile`` (beat): close every open hold whose job ended, was forgotten by Redis or is past its deadline
  (azu.billing.reconcile).

A worker process consuming ``core`` also runs the report collector (azu.network.collector) in a thread. One
collector acts at a time however many processes run one (a Redis lease), so a separate
``python -m azu.cli.processes collector`` beside it is harmless. The verifier is a process of its own
(``python -m azu.cli.processes verifier``): a check's compute must not hold up the collector.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from azu import metrics
from azu.config import redis_url
from azu.network import dispatch, jobs
from azu.network import watchdog as job_watchdog
from workers import app

log = logging.getLogger(__name__)
_collector: Any = None


@worker_ready.connect
def _start_collector(sender: Any = None, **_: Any) -> None:
    global _collector
    consumer = getattr(sender, "task_consumer", None)
    queues = {q.name for q in getattr(consumer, "queues", [])} if consumer is not None else set()
    if dispatch.CORE_QUEUE not in queues:
        return
    from azu.network import collector

    _collector = collector.start_thread()
    log.info("report collector started")


@worker_shutdown.connect
def _stop_collector(**_: Any) -> None:
    if _collector is not None:
        thread, stop = _collector
        stop.set()
        thread.join(timeout=5)


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(redis_url())


@app.task(name=dispatch.SETTLE, ignore_result=True, autoretry_for=(Exception,),
          retry_backoff=2, retry_backoff_max=300, max_retries=20)
def settle(*, job_id: str) -> str:
    """Billing is idempotent per job (the ledger and the job's ``settled`` mark), so retries are safe."""
    from azu.billing.factory import get_billing

    outcome = jobs.bill_ended_job(_redis(), job_id, billing=get_billing())
    if outcome in ("settled", "released"):
        metrics.CORE_SETTLEMENTS.inc(_redis(), outcome=outcome)
    return outcome


@app.task(name=dispatch.WATCHDOG, ignore_result=True)
def watchdog() -> list[str]:
    return job_watchdog.tick(_redis())


@app.task(name=dispatch.PLACE, ignore_result=True)
def place(*, model_id: str) -> int:
    return len(jobs.ensure_placed(_redis(), model_id))


RECONCILE = "workers.scheduler.reconcile"


# acks_late off: a redelivered beat tick is pointless (the next one comes anyway); a run is idempotent and
# holds a PostgreSQL advisory lock, so overlapping runs move nothing twice.
@app.task(name=RECONCILE, acks_late=False, ignore_result=True)
def reconcile() -> dict[str, Any]:
    """No hold left behind: settle or release the holds their jobs can no longer close."""
    from azu.billing.factory import process_ledger
    from azu.billing.reconcile import reconcile as run

    ledger = process_ledger()
    if not ledger.configured:
        return {"skipped": True}  # no ledger, no holds (FreeBilling)
    return run(_redis(), ledger.engine, ledger.billing).as_dict()
