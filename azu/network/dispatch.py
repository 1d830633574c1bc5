"""Sending tasks: the seam to Celery, the queue names, and one typed sender per task.

azu/ must not import Celery, so the Celery app (``workers``) registers the implementation when it is
imported, and ``get_dispatcher()`` imports it on first use. Task names live here and nowhere else in azu/.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from azu.config import get_settings

if TYPE_CHECKING:
    from azu.engine.span import Span

CORE_QUEUE = "core"
REGISTRY_QUEUE = "registry"

# Task names (workers/ registers each under exactly this name).
FORWARD = "workers.stage.forward"
LOAD = "workers.stage.load"
END_JOB = "workers.stage.end_job"
PING = "workers.stage.ping"
SETTLE = "workers.scheduler.settle"
WATCHDOG = "workers.scheduler.watchdog"
PLACE = "workers.scheduler.place"
SHARD = "workers.registry.shard"


def worker_queue(worker_id: str) -> str:
    """The step queue of one worker node: ``gpu.<worker_id>`` (forward only; anyone may wake it)."""
    return f"gpu.{worker_id}"


def control_queue(worker_id: str) -> str:
    """The control queue of one worker node: ``ctl.<worker_id>`` (load, evidence, ping; the core only)."""
    return f"ctl.{worker_id}"


def worker_queues(worker_id: str) -> str:
    """What a worker node consumes (``celery worker -Q``)."""
    return f"{worker_queue(worker_id)},{control_queue(worker_id)}"


class Dispatcher(Protocol):
    def send_task(self, name: str, *, queue: str, args: list[Any] | tuple[Any, ...] = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        """Enqueue task ``name`` on ``queue``; never waits for a result."""


_dispatcher: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    global _dispatcher
    _dispatcher = dispatcher


def get_dispatcher() -> Dispatcher:
    """The registered dispatcher; imports ``AZU_DISPATCHER`` (default: the Celery app ``workers``) once."""
    if _dispatcher is None:
        importlib.import_module(get_settings().dispatcher)
    if _dispatcher is None:
        raise RuntimeError("no dispatcher registered (the workers package registers the Celery one)")
    return _dispatcher


# --- one sender per task ------------------------------------------------------------------------
def send_forward(worker_id: str, payloads: Sequence[bytes], *, dispatch: Dispatcher | None = None) -> None:
    """Wake worker ``worker_id`` (with signed step bundles, or none: it takes its inbox)."""
    (dispatch or get_dispatcher()).send_task(FORWARD, queue=worker_queue(worker_id), args=[list(payloads)])


def send_load(worker_id: str, model_id: str, span: Span, *, manifest_sha256: str | None = None,
              dispatch: Dispatcher | None = None) -> None:
    """A load order: worker ``worker_id`` fetches ``span`` of ``model_id`` from the registry and holds it."""
    (dispatch or get_dispatcher()).send_task(
        LOAD, queue=control_queue(worker_id),
        kwargs={"model_id": model_id, "span": span.to_list(), "manifest_sha256": manifest_sha256})


def send_end_job(worker_id: str, *, job_id: str, epoch: int, sig: bytes,
                 dispatch: Dispatcher | None = None) -> None:
    """Tell ``worker_id`` the job is over (``sig``: the core's signature of the order)."""
    (dispatch or get_dispatcher()).send_task(
        END_JOB, queue=control_queue(worker_id), kwargs={"job_id": job_id, "epoch": epoch, "sig": sig})


def send_ping(worker_id: str, key: str, value: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask ``worker_id`` to answer ``value`` for ``key`` (``azu:ping:*``, written by the collector) once it
    reaches this message."""
    (dispatch or get_dispatcher()).send_task(PING, queue=control_queue(worker_id), args=[key, value])


def send_settle(job_id: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the scheduler to bill an ended job (charge its usage, or release its hold)."""
    (dispatch or get_dispatcher()).send_task(SETTLE, queue=CORE_QUEUE, kwargs={"job_id": job_id})


def send_place(model_id: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the scheduler to make ``model_id`` servable ahead of its first job."""
    (dispatch or get_dispatcher()).send_task(PLACE, queue=CORE_QUEUE, kwargs={"model_id": model_id})


def send_shard(model_id: str, source: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the registry to shard ``source`` as ``model_id``."""
    (dispatch or get_dispatcher()).send_task(SHARD, queue=REGISTRY_QUEUE,
                                             kwargs={"model_id": model_id, "source": source})
