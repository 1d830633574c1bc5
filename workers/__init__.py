"""The Celery app. Thin: tasks receive, call azu, send on. ``celery -A workers worker -Q <queue>``.

Every task is an ``AzuTask`` (``Celery(task_cls=...)``): while one runs, every log record of the process
(azu's loggers included, which know nothing of Celery) carries its id as ``task_id``, which the worker's log
format (celeryconfig.worker_log_format) prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import msgpack
import redis
from celery import Celery, Task
from kombu import compression
from kombu.serialization import register
from kombu.transport import redis as kombu_redis

from azu.network.dispatch import set_dispatcher
from azu.network.wire import unpack_task_body

_running_task = contextvars.ContextVar("azu_running_task", default="-")


class AzuTask(Task):
    """The base of every azu task: binds the task's id into the log records made while it runs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = _running_task.set(self.request.id or "-")
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _running_task.reset(bound)


def _bind_task_id(make_record: Any) -> Any:
    # A record factory rather than a handler filter: it reaches every record, whichever handler (Celery's,
    # the multiprocessing logger's, an operator's) formats it, so a format naming task_id never fails.
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = make_record(*args, **kwargs)
        record.task_id = _running_task.get()
        return record

    return make


logging.setLogRecordFactory(_bind_task_id(logging.getLogRecordFactory()))

# Celery's msgpack, read within limits: kombu's own decoder would build an object per byte of a message
# another worker's login put on this worker's queue (azu.network.wire.Limits). Written as kombu writes it.
register("msgpack", lambda body: msgpack.packb(body, use_bin_type=True), unpack_task_body,
         content_type="application/x-msgpack", content_encoding="binary")


def _refuse_compressed(body: bytes) -> bytes:
    raise ValueError("a compressed message: azu sends none (its size unpacked is the sender's to choose)")


# kombu unpacks a message its ``compression`` header names before anything reads it: 785 bytes of bzip2 are
# 1 GiB. azu compresses nothing, so every compression kombu knows is refused here (encoders kept as they are).
for _kind in compression.encoders():
    compression.register(compression.get_encoder(_kind)[0], _refuse_compressed, _kind)


@contextlib.contextmanager
def _mutex_without_lua(client: Any, name: str, expire: int) -> Iterator[None]:
    """kombu's ``Mutex`` (the lock around restoring unacknowledged messages) without Lua: redis-py's lock
    releases by a script, and a worker's broker login may run none (docs/security.md: one script that loops
    holds Redis for everyone). Taken with SET NX EX; released under WATCH, only while the token is still
    ours (it may have expired and been taken by another consumer meanwhile)."""
    token = secrets.token_hex(16).encode()
    if not client.set(name, token, nx=True, ex=int(expire)):
        raise kombu_redis.MutexHeld()
    try:
        yield
    finally:
        with client.pipeline() as pipe, contextlib.suppress(redis.WatchError):
            pipe.watch(name)
            if pipe.get(name) == token:
                pipe.multi()
                pipe.delete(name)
                pipe.execute()


kombu_redis.Mutex = _mutex_without_lua  # looked up when restore_visible runs

app = Celery("workers", task_cls=AzuTask,
             include=["workers.payouts", "workers.stage", "workers.scheduler", "workers.registry"])
app.config_from_object("celeryconfig")


class CeleryDispatcher:
    """azu.network.dispatch.Dispatcher over this app: per-call routing with ``sig.set(queue=...)``."""

    def send_task(self, name: str, *, queue: str, args: list[Any] | tuple[Any, ...] = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        # The anonymous exchange: kombu puts the message straight on the queue named by the routing key,
        # skipping the exchange-binding lookup (a Redis round trip) that a named exchange costs per publish.
        # Short reprs: Celery would otherwise saferepr every argument (KBs of tensor bytes) into the headers.
        sig = app.signature(name, args=tuple(args), kwargs=kwargs or {})
        # declare=[]: publish only. Declaring the target queue would read it (LLEN) and write its binding
        # sets, which a worker's broker login may not do for another worker's queue.
        sig.set(queue=queue, exchange="", routing_key=queue, argsrepr=f"<{len(args)} args>",
                kwargsrepr=f"<{len(kwargs or {})} kwargs>").apply_async(declare=[])


# azu/ never imports Celery: it sends through whatever dispatcher the process registered.
set_dispatcher(CeleryDispatcher())


def use_broker(broker_url: str) -> None:
    """Send this process's messages to ``broker_url`` from now on.

    The app reads its broker once, at import, and caches connection and producer pools; a process that
    talks to several brokers in turn (a test suite whose folders each run their own Redis) resets them.
    """
    app.conf.broker_url = broker_url
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
