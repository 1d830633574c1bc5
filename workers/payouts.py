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
from azu.payments.payouts import PayoutRunner
from workers import app

log = logging.getLogger(__name__)


@cache
def runner() -> PayoutRunner:
    """One per worker process: it keeps the engine's pool and the provider's connection between runs."""
    ledger = process_ledger()
    provider = ledger.provider
    threshold = economics.payout_threshold(decimals=provider.decimals)
    return PayoutRunner(session_factory(ledger.engine), provider, threshold=threshold)


# acks_late off: a redelivered beat tick is pointless (the next tick comes anyway), and the run itself is
# idempotent under its lock.
@app.task(name="workers.payouts.pay_due", acks_late=False, ignore_result=True)
def pay_due() -> dict[str, Any]:
    report = runner().pay_due()
    return report.as_dict()


@app.task(name="workers.payouts.confirm_sent", acks_late=False, ignore_result=True)
def confirm_sent() -> dict[str, Any]:
    report = runner().confirm_sent()
    return report.as_dict()
