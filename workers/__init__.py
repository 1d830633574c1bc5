"""The Celery app. Thin: tasks receive, call azu, send on. ``celery -A workers worker -Q <queue>``."""

from __future__ import annotations

from typing import Any

from celery import Celery

from azu.network.dispatch import set_dispatcher

app = Celery("workers", include=["workers.payouts", "workers.stage", "workers.scheduler", "workers.registry"])
app.config_from_object("celeryconfig")


class CeleryDispatcher:
    """azu.network.dispatch.Dispatcher over this app: per-call routing with ``sig.set(queue=...)``."""

    def send_task(self, name: str, *, queue: str, args: list[Any] | tuple[Any, ...] = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        # The anonymous exchange: kombu puts the message straight on the queue named by the routing key,
        # skipping the exchange-binding lookup (a Redis round trip) that a named exchange costs per publish.
        # Short reprs: Celery would otherwise saferepr every argument (KBs of tensor bytes) into the headers.
        sig = app.signature(name, args=tuple(args), kwargs=kwargs or {})
        sig.set(queue=queue, exchange="", routing_key=queue, argsrepr=f"<{len(args)} args>",
                kwargsrepr=f"<{len(kwargs or {})} kwargs>").apply_async()


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
