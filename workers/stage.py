"""GPU worker tasks (queue ``gpu.<worker_id>``, routed per call). Thin: the work is azu.network.node.

- ``forward``: step payloads (packed ``StepPayload``s) for this worker; it then takes every payload left in
  its inbox meanwhile (azu.network.inbox), so the decode steps of different jobs run as one batch.
- ``load``: a load order: pull a span's files from the registry, check them, hold them.
- ``end_job``: the job is over: free its KV caches here.
- ``ping``: write a key (health checks; tests use it to know earlier messages were handled).

The node starts with the worker process (``worker_ready``) when ``AZU_WORKER_ID`` is set, registers
in the directory and heartbeats from a thread until ``worker_shutdown``.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from azu.config import get_settings
from azu.engine.span import Span
from azu.network import dispatch, keys
from azu.network.node import WorkerNode
from workers import app

log = logging.getLogger(__name__)

_node: WorkerNode | None = None


def node() -> WorkerNode:
    global _node
    if _node is None:  # a task arrived before worker_ready (or in an eager test): start the node now
        settings = get_settings()
        _node = WorkerNode.from_settings(settings, redis.Redis.from_url(settings.redis_url),
                                         dispatch.get_dispatcher())
    return _node


@worker_ready.connect
def _start(**_: Any) -> None:
    if not get_settings().worker.worker_id:
        return  # a core/registry worker: no layers, no heartbeat
    from azu.billing.factory import get_billing

    n = node()
    n.start_heartbeat()
    try:
        get_billing().register_worker(worker_id=n.worker_id, wallet_address=n.wallet)
    except Exception:  # the ledger may be down: the worker still serves, and settles credit it later
        log.exception("could not register worker %s with billing", n.worker_id)
    log.info("worker %s ready on queue %s (%s)", n.worker_id, dispatch.worker_queue(n.worker_id),
             n.info().device)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _node is not None:
        _node.stop()


@app.task(name=dispatch.FORWARD, ignore_result=True)
def forward(payloads: list[bytes] | None = None) -> int:
    """Run the step payloads this wake-up carries, then every step left for this worker meanwhile."""
    return node().process_pending(list(payloads or []))


@app.task(name=dispatch.LOAD, ignore_result=True)
def load(*, model_id: str, span: list[Any], manifest_sha256: str | None = None) -> None:
    node().load(model_id=model_id, span=Span.from_list(span), manifest_sha256=manifest_sha256)


@app.task(name=dispatch.END_JOB, ignore_result=True)
def end_job(*, job_id: str, model_id: str, route: list[Any], token: str) -> None:
    node().end_job(job_id=job_id, model_id=model_id, route=route, token=token)


@app.task(name=dispatch.PING, ignore_result=True)
def ping(key: str, value: str) -> None:
    """Write ``value`` under ``key`` (only ``azu:ping:*`` keys)."""
    if not key.startswith(keys.PING_PREFIX):
        return
    node().r.set(key, value, ex=3600)
