"""``LedgerBilling``: the ``azu.billing.base.Billing`` seam backed by the PostgreSQL ledger."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from azu.billing import economics
from azu.billing.accounts import hash_api_key, user_for_key_hash
from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.errors import InvalidRequest, Unauthorized

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which PostgreSQL rolled the whole transaction back and a retry is the documented remedy.
_RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def run_in_transaction(engine: Engine, fn: Callable[[Session], T], *, attempts: int = 3) -> T:
    """Run ``fn`` in one committed transaction, retrying when PostgreSQL aborted it for a deadlock or a
    serialization failure. Safe because every ledger operation is idempotent."""
    for attempt in range(1, attempts + 1):
        try:
            with session_scope(engine) as session:
                return fn(session)
        except OperationalError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate not in _RETRYABLE or attempt == attempts:
                raise
            log.warning("ledger transaction aborted (%s), retry %d", sqlstate, attempt)
            time.sleep(0.01 * attempt)  # back off a little before retrying, not a synchronization
    raise AssertionError("unreachable")


class LedgerBilling:
    """Who is asking (API key -> wallet address), can they pay (hold), who earned what (settle)."""

    def __init__(
        self,
        engine: Engine,
        *,
        price_per_token_layer: int | None = None,
        normalize_address: Callable[[str], str] | None = None,
    ) -> None:
        self.engine = engine
        # A payment provider's validate_address, so a worker's payout wallet is checked before it is stored.
        self.normalize_address = normalize_address
        self.price = (
            economics.price_per_token_layer() if price_per_token_layer is None else price_per_token_layer
        )

    def authenticate(self, api_key: str | None) -> str:
        if not api_key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <api key>' (POST /auth/keys)")
        key_hash = hash_api_key(api_key)
        address = run_in_transaction(self.engine, lambda s: user_for_key_hash(s, key_hash))
        if address is None:
            raise Unauthorized("unknown or revoked API key")
        return address

    def hold(self, *, user_id: str, job_id: str, model_id: str, max_token_layers: int) -> None:
        if (
            isinstance(max_token_layers, bool)
            or not isinstance(max_token_layers, int)
            or max_token_layers < 0
        ):
            raise InvalidRequest("max_token_layers must be a non-negative integer")
        amount = economics.cost(max_token_layers, self.price)
        run_in_transaction(
            self.engine,
            lambda s: service.place_hold(
                s, job_id=job_id, user_address=user_id, amount=amount, model_id=model_id, price=self.price
            ),
        )

    def settle(self, *, job_id: str, usage: dict[str, int]) -> None:
        run_in_transaction(self.engine, lambda s: service.settle_hold(s, job_id=job_id, usage=dict(usage)))

    def release(self, *, job_id: str) -> None:
        run_in_transaction(self.engine, lambda s: service.release_hold(s, job_id=job_id))

    def register_worker(self, *, worker_id: str, wallet_address: str | None) -> None:
        wallet = (
            self.normalize_address(wallet_address)
            if wallet_address and self.normalize_address
            else wallet_address
        )

        def register(session: Session) -> None:
            service.worker_account(session, worker_id)
            if wallet:
                service.set_worker_wallet(session, worker_id, wallet)

        run_in_transaction(self.engine, register)

    def withhold(self, *, job_id: str, worker_id: str, reason: str, evidence: dict[str, Any]) -> None:
        run_in_transaction(
            self.engine,
            lambda s: service.withhold_job_earnings(
                s, job_id=job_id, worker_id=worker_id, reason=reason, evidence=evidence
            ),
        )

    def freeze_worker(self, *, worker_id: str, reason: str) -> None:
        run_in_transaction(
            self.engine, lambda s: service.freeze_worker(s, worker_id=worker_id, reason=reason)
        )

    def unfreeze_worker(self, *, worker_id: str) -> None:
        """An operator's ruling (not part of the Billing seam: the network never clears a worker)."""
        run_in_transaction(self.engine, lambda s: service.unfreeze_worker(s, worker_id=worker_id))
