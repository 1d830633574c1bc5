"""GPU worker tasks (queue ``gpu.<worker_id>``, routed per call). Thin: the work is azu.network.node.

- ``forward``: step payloads (msgpack bytes) for this worker. Payloads that arrive while the worker is busy
  wait in Redis (``azu:pending:<worker>``) and are run together as the next batch before the task ends,
  so the decode steps of different jobs run as one ``forward_batch`` (see azu.network.jobs.send_steps).
- ``load``: a load order: pull the layer group's files from the registry, check them, hold them.
- ``end_job``: the job is over: free its KV caches here.

The node starts with the worker process (``worker_ready``) when ``AZU_WORKER_ID`` is set, registers
in the directory and heartbeats from a thread until ``worker_shutdown``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from azu.config import redis_url
from azu.network.dispatch import get_dispatcher
from azu.network.node import WorkerNode, node_from_env
from workers import app

log = logging.getLogger(__name__)

_node: WorkerNode | None = None


def node() -> WorkerNode:
    global _node
    if _node is None:  # a task arrived before worker_ready (or in an eager test): start the node now
        _node = node_from_env(redis.Redis.from_url(redis_url()), dispatch=get_dispatcher())
    return _node


@worker_ready.connect
def _start(**_: Any) -> None:
    if not os.environ.get("AZU_WORKER_ID"):
        return  # a core/registry worker: no layers, no heartbeat
    from azu.billing.base import get_billing

    n = node()
    n.start_heartbeat(float(os.environ.get("AZU_HEARTBEAT_S") or 3.0))
    try:
        get_billing().register_worker(worker_id=n.worker_id, wallet_address=n.wallet)
    except Exception:  # the ledger may be down: the worker still serves, and settles credit it later
        log.exception("could not register worker %s with billing", n.worker_id)
    log.info("worker %s ready on queue gpu.%s (%s)", n.worker_id, n.worker_id, n.info().device)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _node is not None:
        _node.stop()


@app.task(name="workers.stage.forward", ignore_result=True)
def forward(payloads: list[bytes] | None = None) -> int:
    """Run the step payloads this wake-up carries, then every step left for this worker meanwhile."""
    return node().process_pending(list(payloads or []))


@app.task(name="workers.stage.load", ignore_result=True)
def load(**order: Any) -> None:
    node().load(**order)


@app.task(name="workers.stage.end_job", ignore_result=True)
def end_job(*, job_id: str, model_id: str, route: list[Any], token: str) -> None:
    node().end_job(job_id=job_id, model_id=model_id, route=route, token=token)


@app.task(name="workers.stage.ping", ignore_result=True)
def ping(key: str, value: str) -> None:
    """Write ``value`` under ``key`` (health checks; tests use it to know earlier messages were handled)."""
    if not key.startswith("azu:ping:"):
        return
    node().r.set(key, value, ex=3600)
