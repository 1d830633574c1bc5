"""The one builder of billing, ledger and payment provider from the settings, used by every process.

The API (accounts routes, holds), the scheduler (settlement, payouts) and the CLI build what they need
here; nothing connects at import time or when built: the engine and the provider are made on first use,
so a server without a ledger still starts and answers 503 ``ledger_unavailable`` where the ledger is needed.
Worker nodes never build any of this: they hold no database URL.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from azu.billing.base import Billing, FreeBilling
from azu.config import Settings, get_settings
from azu.errors import LedgerUnavailable

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from azu.billing.ledger.billing import LedgerBilling
    from azu.payments.base import PaymentProvider

log = logging.getLogger(__name__)


class Ledger:
    """The ledger's engine, the payment provider and the billing seam over them, each made on first use."""

    def __init__(self, settings: Settings | None = None, *, engine: Engine | None = None,
                 provider: PaymentProvider | None = None) -> None:
        self.settings = settings or get_settings()
        self._engine = engine
        self._provider = provider
        self._billing: LedgerBilling | None = None

    @property
    def configured(self) -> bool:
        """A database is set: the ledger is this process's billing."""
        return self._engine is not None or bool(self.settings.database_url)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if not self.settings.database_url:
                raise LedgerUnavailable("the ledger is not configured on this server (set DATABASE_URL)")
            from azu.billing.ledger.db import make_engine

            self._engine = make_engine(self.settings.database_url)
        return self._engine

    @property
    def provider(self) -> PaymentProvider:
        if self._provider is None:
            from azu.payments.factory import get_provider

            try:
                self._provider = get_provider(self.settings.payments.provider)
            except ValueError as exc:  # missing/malformed settings: a server problem, said plainly
                log.error("payment provider unavailable: %s", exc)
                raise LedgerUnavailable(f"the payment provider is not configured on this server: {exc}") \
                    from None
        return self._provider

    @property
    def billing(self) -> LedgerBilling:
        """``LedgerBilling`` whose worker wallets are checked by the provider before they are stored."""
        if self._billing is None:
            from azu.billing.ledger.billing import LedgerBilling

            self._billing = LedgerBilling(self.engine,
                                          normalize_address=lambda a: self.provider.validate_address(a))
        return self._billing


def build_billing(ledger: Ledger | None = None) -> Billing:
    """The ledger's billing when a database is configured, else ``FreeBilling`` (development)."""
    ledger = ledger or Ledger()
    return ledger.billing if ledger.configured else FreeBilling()


_process_ledger: Ledger | None = None


def process_ledger() -> Ledger:
    """This process's ledger (one engine pool and one provider per process)."""
    global _process_ledger
    if _process_ledger is None or _process_ledger.settings != get_settings():
        _process_ledger = Ledger(get_settings())
    return _process_ledger


def get_billing() -> Billing:
    """This process's billing: the ledger when DATABASE_URL is set, else FreeBilling."""
    return build_billing(process_ledger())
