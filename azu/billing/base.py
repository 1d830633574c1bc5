"""The seam between the pipeline and the money: who is asking, can they pay, who earned what.

The network (web/ + workers/) talks only to this protocol. ``FreeBilling`` serves development
without a ledger; the PostgreSQL ledger (azu.billing.ledger) provides the real implementation, and
``azu.billing.factory.get_billing()`` picks between them from the settings.
"""

from __future__ import annotations

from typing import Any, Protocol

from azu.errors import Conflict


class JobNotSettled(Conflict):
    """A verdict came for a job whose bill is not settled yet: nothing to withhold yet; retry after
    settlement (the scheduler settles every ended job)."""

    code = "job_not_settled"


class Billing(Protocol):
    def authenticate(self, api_key: str | None) -> str:
        """Return the user id owning ``api_key``; raise azu.errors.Unauthorized if it is unknown/revoked."""

    def hold(self, *, user_id: str, job_id: str, model_id: str, max_token_layers: int) -> None:
        """Reserve the most the job can cost; azu.errors.PaymentRequired when the balance can't.

        Idempotent per job_id.
        """

    def settle(self, *, job_id: str, usage: dict[str, int]) -> None:
        """Charge actual usage (worker_id -> token-layers it ran), credit workers 80% / platform 20%,
        release the rest of the hold. One transaction; settling a job twice changes nothing."""

    def release(self, *, job_id: str) -> None:
        """Give the whole hold back (the job failed before any token was produced). Idempotent."""

    def register_worker(self, *, worker_id: str, wallet_address: str | None) -> None:
        """Make sure the worker has a ledger account (and a payout address, when given)."""

    def withhold(self, *, job_id: str, worker_id: str, reason: str, evidence: dict[str, Any]) -> None:
        """The verifier found ``worker_id``'s numbers for the settled job ``job_id`` wrong.

        Takes what settlement credited the worker for the job out of its account into its withheld account
        (what is left of it, if it was already paid out: the shortfall is recorded), refunds the user the
        job's whole charge (from the platform, as far as its balance goes), and keeps a verdict with
        ``reason`` and ``evidence`` (a small JSON object: hop, chunk, max difference, digests...).
        Idempotent per (job, worker); a job is refunded once however many of its workers are found wrong.
        Raises JobNotSettled before the job's bill is settled, NotFound for a job the ledger never held.
        """

    def freeze_worker(self, *, worker_id: str, reason: str) -> None:
        """Pay ``worker_id`` nothing more until an operator clears it (``reason`` is kept). Idempotent: a
        second freeze keeps the first reason."""


class FreeBilling:
    """No accounts, no money: every request is user "local". For development and engine-only tests."""

    def authenticate(self, api_key: str | None) -> str:
        return "local"

    def hold(self, *, user_id: str, job_id: str, model_id: str, max_token_layers: int) -> None:
        return None

    def settle(self, *, job_id: str, usage: dict[str, int]) -> None:
        return None

    def release(self, *, job_id: str) -> None:
        return None

    def register_worker(self, *, worker_id: str, wallet_address: str | None) -> None:
        return None

    def withhold(self, *, job_id: str, worker_id: str, reason: str, evidence: dict[str, Any]) -> None:
        return None

    def freeze_worker(self, *, worker_id: str, reason: str) -> None:
        return None

