"""Beat jobs that pay workers on chain. Thin: the logic (and its exactly-once reasoning) is
azu.payments.payouts.

``celery -A workers beat`` enqueues both every ``PAYOUT_INTERVAL_S`` seconds (celeryconfig.beat_schedule);
a worker consuming the ``core`` queue runs them. Overlapping runs are harmless: each run takes a PostgreSQL
advisory lock and a run that finds it taken does nothing.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from azu.billing import economics
from azu.billing.factory import process_ledger
from azu.billing.ledger.db import session_factory
from azu.errors import LedgerUnavailable
from azu.payments.payouts import PayoutRunner
from workers import app

log = logging.getLogger(__name__)
_said_unavailable: set[str] = set()  # reasons already logged by this process (once each, not every tick)


@cache
def runner() -> PayoutRunner:
    """One per worker process: it keeps the engine's pool and the provider's connection between runs."""
    ledger = process_ledger()
    provider = ledger.provider
    threshold = economics.payout_threshold(decimals=provider.decimals)
    return PayoutRunner(session_factory(ledger.engine), provider, threshold=threshold)


# acks_late off: a redelivered beat tick is pointless (the next tick comes anyway), and the run itself is
# idempotent under its lock.
def _configured_runner() -> PayoutRunner | None:
    """The runner, or None (said once, in one line) when this core has no ledger or no payment provider:
    a network without payouts is a configuration, not an error to trace back twice a minute."""
    try:
        return runner()
    except LedgerUnavailable as exc:
        if exc.message not in _said_unavailable:
            _said_unavailable.add(exc.message)
            log.warning("payouts are off: %s", exc.message)
        return None


@app.task(name="workers.payouts.pay_due", acks_late=False, ignore_result=True)
def pay_due() -> dict[str, Any]:
    pay = _configured_runner()
    return pay.pay_due().as_dict() if pay else {"skipped": "payouts are not configured"}


@app.task(name="workers.payouts.confirm_sent", acks_late=False, ignore_result=True)
def confirm_sent() -> dict[str, Any]:
    pay = _configured_runner()
    return pay.confirm_sent().as_dict() if pay else {"skipped": "payouts are not configured"}
