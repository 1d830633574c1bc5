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
heartbeat from a thread until ``worker_shutdown``. A ``forward`` session can last long (it lingers when idle,
``AZU_LINGER_S``, and runs on while jobs keep coming): Celery's warm shutdown waits for it, so
``worker_shutting_down`` tells the node to end it; and a solo worker's own Celery heartbeat stops while a task
runs (its event loop is the task's thread), so ``_BusyHeart`` sends it meanwhile, for every task (Flower shows
a worker silent for two heartbeats as offline).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import redis
from celery.signals import (
    heartbeat_sent,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.sysinfo import load_average
from celery.worker import state as celery_state

from azu import metrics
from azu.config import get_settings
from azu.engine.span import Span
from azu.network import dispatch, keys
from azu.network.node import WorkerNode
from azu.verification.orders import EVIDENCE
from workers import app

log = logging.getLogger(__name__)

_node: WorkerNode | None = None


class _BusyHeart:
    """Celery's ``worker-heartbeat`` for this worker while it runs a task, from a thread of its own (with
    its own broker connection), an interval after the last one Celery's heart or this sent; Celery's heart
    sends the rest (``heartbeat_sent`` tells this when)."""

    def __init__(self, hostname: str, interval: float) -> None:
        self.hostname = hostname
        self.interval = interval
        self.last_beat = time.monotonic()
        self._busy = threading.Event()
        self._lock = threading.Lock()  # a beat is not sent after the task ended (and Celery said offline)
        self._thread = threading.Thread(target=self._run, name="azu-busy-heart", daemon=True)
        self._thread.start()

    def busy(self, running: bool) -> None:
        with self._lock:
            (self._busy.set if running else self._busy.clear)()

    def beat_sent(self) -> None:
        self.last_beat = time.monotonic()

    def _run(self) -> None:
        dispatcher = None
        while True:
            self._busy.wait()  # a task runs
            time.sleep(max(0.0, self.last_beat + self.interval - time.monotonic()))
            with self._lock:
                if not self._busy.is_set() or time.monotonic() - self.last_beat < self.interval:
                    continue  # the task ended, or Celery's heart beat meanwhile (between two tasks)
                try:
                    if dispatcher is None:  # errors raised, not buffered for a later send
                        dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=self.hostname,
                                                           groups=["worker"], buffer_while_offline=False)
                    dispatcher.send("worker-heartbeat", freq=self.interval, active=1,
                                    processed=celery_state.all_total_count[0], loadavg=load_average(),
                                    **celery_state.SOFTWARE_INFO)
                except Exception as exc:  # Flower misses a heartbeat; the worker works on
                    log.warning("worker heartbeat for Flower not sent: %s", exc)
                    if dispatcher is not None:
                        with contextlib.suppress(Exception):
                            dispatcher.close()
                            dispatcher.connection.release()
                    dispatcher = None
                self.last_beat = time.monotonic()


_heart: _BusyHeart | None = None


@task_prerun.connect
def _task_starts(**_: Any) -> None:
    if _heart is not None:  # a session, a load (minutes for a large model), any task
        _heart.busy(True)


@task_postrun.connect
def _task_ends(**_: Any) -> None:
    if _heart is not None:
        _heart.busy(False)


@heartbeat_sent.connect
def _celery_beat(**_: Any) -> None:
    if _heart is not None:
        _heart.beat_sent()


def node() -> WorkerNode:
    global _node
    if _node is None:  # a task arrived before worker_ready (or in an eager test): start the node now
        settings = get_settings()
        _node = WorkerNode.from_settings(settings, redis.Redis.from_url(settings.redis_url),
                                         dispatch.get_dispatcher())
    return _node


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _heart
    if not get_settings().worker.worker_id:
        return  # a core/registry worker: no layers, no heartbeat

    n = node()
    heart = getattr(sender, "heart", None)  # the consumer's; None with --without-heartbeat
    if heart is not None:
        _heart = _BusyHeart(sender.hostname, heart.interval)
    n.start_heartbeat()
    settings = get_settings().metrics
    if settings.port:
        try:
            metrics.start_worker_server(settings.port, host=settings.host)
        except OSError as exc:  # the worker still serves; only its metrics are missing
            log.error("worker metrics: cannot listen on %s:%s (%s)", settings.host, settings.port, exc)
    log.info("worker %s ready on queues %s (%s), public key %s", n.worker_id,
             dispatch.worker_queues(n.worker_id), n.info().device, n.public_key)


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """Warm shutdown: Celery waits for the running task; a session ends once it has nothing to run. (In the
    signal handler: it only sets an event.)"""
    if _node is not None:
        _node.end_sessions()


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
