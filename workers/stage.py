"""GPU worker tasks. Thin: the work is azu.network.node.

On ``gpu.<worker_id>`` (anyone may wake a worker; every payload is signed and checked):
- ``forward``: a wake-up (optionally carrying signed step bundles); the worker then takes every bundle left
  in its inbox meanwhile (azu.network.inbox), so the decode steps of different jobs run as one batch.
On ``ctl.<worker_id>`` (the core's orders; only core processes may write it):
- ``load``: a load order: pull a span's files from the registry, check them, hold them.
- ``end_job``: the job is over (an order the core signed): free its KV caches here. The core now puts this
  order in the worker's inbox beside the steps (azu.network.jobs.end_caches: a busy worker takes it without
  ending its session); the task stays for orders still on the queue from a core of the round before.
- ``ping``: answer a health check (tests use it to know earlier messages were handled).
- ``evidence``: send the core the signed bundles kept for a job it re-computes (azu.verification).

The node starts with the worker process (``worker_ready``) when ``AZU_WORKER_ID`` is set and reports its
heartbeat from a thread until ``worker_shutdown``.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from azu import metrics
from azu.config import get_settings
from azu.engine.span import Span
from azu.network import dispatch, keys
from azu.network.node import WorkerNode
from azu.verification.orders import EVIDENCE
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

    n = node()
    n.start_heartbeat()
    settings = get_settings().metrics
    if settings.port:
        try:
            metrics.start_worker_server(settings.port, host=settings.host)
        except OSError as exc:  # the worker still serves; only its metrics are missing
            log.error("worker metrics: cannot listen on %s:%s (%s)", settings.host, settings.port, exc)
    log.info("worker %s ready on queues %s (%s), public key %s", n.worker_id,
             dispatch.worker_queues(n.worker_id), n.info().device, n.public_key)


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
def end_job(*, job_id: str, epoch: int, sig: bytes) -> None:
    node().end_job(job_id=job_id, epoch=epoch, sig=sig)


@app.task(name=dispatch.PING, ignore_result=True)
def ping(key: str, value: str) -> None:
    """Answer ``value`` for ``key`` (the collector writes it, ``azu:ping:*`` keys only)."""
    if isinstance(key, str) and key.startswith(keys.PING_PREFIX) and isinstance(value, str):
        node().ping(key, value)


@app.task(name=EVIDENCE, ignore_result=True)
def evidence(*, job_id: str, epoch: int, sig: bytes) -> None:
    """Send the core the signed bundles kept for the job (an order the core signed; azu.verification)."""
    node().send_evidence(job_id=job_id, epoch=epoch, sig=sig)
