"""Paying workers on chain, exactly once. Framework-free: the Celery beat tasks in workers/payouts.py only
call ``PayoutRunner.pay_due`` / ``confirm_sent``.

The order of writes is what makes it exactly-once:

1. ``create_payout`` debits the worker into the payouts-in-flight account and writes a pending payout, and
   that transaction COMMITS before anything is signed;
2. the transfer is signed (so its tx id is known) and ``record_signed`` COMMITS tx id, nonce and the
   signed bytes before a byte is broadcast;
3. only then is it broadcast, and ``mark_sent`` commits.

A crash, timeout, lost answer or RPC error anywhere leaves a payout whose next step the chain can tell: each
run first reconciles every open payout by its tx id —

- on chain and confirmed -> confirmed; on chain, reverted -> failed -> reversed to the worker;
- not on chain, and its nonce was consumed by another transaction (EVM) / its blockhash expired (Solana) ->
  it can never land: failed -> reversed, and the worker is paid again by a new payout;
- not on chain and still able to land -> the SAME signed bytes are broadcast again (never a new payment);
  empty nonces below it (a gap) are first filled with zero-value self-transfers, or nothing could be mined.
  Should the stored bytes be missing (a row written without them), a zero-value transfer takes the
  payout's nonce instead: then either the payout or that filler lands, never both, and the next run
  settles it by the rules above.

Nonces: next = max(chain's pending nonce, highest nonce of an open payout + 1). Two runs never overlap: every
run holds a PostgreSQL advisory lock (session-level, on its own connection, so a crashed run's lock dies
with its connection); a run that finds it taken does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from azu.billing.ledger import service
from azu.errors import Conflict, InvalidRequest
from azu.payments.base import ChainError, PaymentProvider, PayoutState, SignedPayout

log = logging.getLogger(__name__)

# pg advisory lock key shared by every payout run (an arbitrary constant: "azu payouts" in ASCII, truncated).
PAYOUT_LOCK_KEY = 0x617A755F706179


@dataclass
class RunReport:
    """What one run did, for logs and tests."""

    skipped: bool = False  # another run held the lock: this one did nothing
    created: int = 0  # new payouts written (worker debited)
    broadcast: int = 0  # payouts broadcast for the first time
    resent: int = 0  # payouts whose same signed bytes were broadcast again
    confirmed: int = 0
    reversed: int = 0  # failed payouts given back to their worker
    fillers: int = 0  # zero-value transactions sent to fill or take a nonce
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Open:
    """A plain copy of an open payout row (ORM objects do not outlive their session here)."""

    id: int
    worker_id: str
    amount: int
    to_address: str
    status: str
    tx_id: str | None
    nonce: int | None
    raw: bytes | None


@contextmanager
def advisory_lock(engine: Engine, key: int = PAYOUT_LOCK_KEY) -> Iterator[bool]:
    """Try to take the payout lock; yields whether this run got it. Held on a dedicated connection (not a
    pooled session's) so that committing the run's own transactions never hands the lock to someone else."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        conn.close()


class PayoutRunner:
    """Pays due workers through ``provider`` and follows the payouts to the end. One per process."""

    def __init__(self, session_factory: sessionmaker[Session], provider: PaymentProvider, *,
                 threshold: int) -> None:
        if threshold <= 0:
            raise ValueError("the payout threshold must be positive")
        self.sessions = session_factory
        self.provider = provider
        self.threshold = threshold
        bind = session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise ValueError("the session factory must be bound to an Engine (the advisory lock needs it)")
        self.engine = bind

    # -- entry points -----------------------------------------------------------------------------
    def pay_due(self) -> RunReport:
        """Reconcile open payouts, then pay every worker whose balance reached the threshold."""
        return self._run(create=True)

    def confirm_sent(self) -> RunReport:
        """Reconcile open payouts only (confirm, resend, or reverse them)."""
        return self._run(create=False)

    def _run(self, *, create: bool) -> RunReport:
        report = RunReport()
        with advisory_lock(self.engine) as got:
            if not got:
                report.skipped = True
                log.info("payout run skipped: another run holds the lock")
                return report
            try:
                self._reconcile(report)
                self._sign_unsigned(report)
                if create:
                    self._create_due(report)
            except ChainError as exc:  # the node is unreachable: stop here, the next run picks up
                report.errors.append(str(exc))
                log.warning("payout run stopped: %s", exc)
        if report.errors:
            log.warning("payout run: %s", report.as_dict())
        else:
            log.info("payout run: %s", report.as_dict())
        return report

    # -- ledger helpers ---------------------------------------------------------------------------
    def _open_payouts(self) -> list[_Open]:
        with self.sessions.begin() as s:
            rows = service.payouts_in(s, "pending", "sent")
            return [_Open(p.id, p.worker_id, int(p.amount), p.to_address, p.status, p.tx_id, p.nonce,
                          p.raw_tx) for p in rows]

    def _mark(self, fn: Any, payout_id: int, *args: Any) -> None:
        with self.sessions.begin() as s:
            fn(s, payout_id, *args)

    def _record_signed(self, payout_id: int, signed: SignedPayout) -> None:
        with self.sessions.begin() as s:
            service.record_signed(s, payout_id, tx_id=signed.tx_id, nonce=signed.nonce, raw=signed.raw)

    # -- the three steps --------------------------------------------------------------------------
    def _reconcile(self, report: RunReport) -> None:
        open_ = [p for p in self._open_payouts() if p.tx_id is not None]
        held = {p.nonce for p in open_ if p.nonce is not None}
        # Lowest nonce first: a resend of nonce n must reach the node before n+1 can be mined.
        for p in sorted(open_, key=lambda p: (p.nonce is None, p.nonce or 0, p.id)):
            assert p.tx_id is not None
            try:
                self._reconcile_one(p, held, report)
            except ChainError as exc:
                report.errors.append(f"payout {p.id}: {exc}")
                log.warning("payout %s not reconciled this run: %s", p.id, exc)

    def _reconcile_one(self, p: _Open, held: set[int], report: RunReport) -> None:
        assert p.tx_id is not None
        state = self.provider.payout_state(p.tx_id)
        if state is PayoutState.CONFIRMED:
            self._mark(service.mark_sent, p.id)
            self._mark(service.mark_confirmed, p.id)
            report.confirmed += 1
            log.info("payout %s confirmed as %s", p.id, p.tx_id)
            return
        if state is PayoutState.PENDING:
            if p.status == "pending":
                self._mark(service.mark_sent, p.id)
            return
        if state is PayoutState.FAILED:
            self._mark(service.mark_failed, p.id, f"transaction {p.tx_id} reverted on chain")
            report.reversed += 1
            log.warning("payout %s reverted on chain (%s); amount returned to worker %s", p.id, p.tx_id,
                        p.worker_id)
            return
        # NOT_FOUND: the chain never saw it, or dropped it.
        raw = p.raw
        signed = SignedPayout(tx_id=p.tx_id, raw=raw or b"", nonce=p.nonce)
        if raw is None and p.nonce is None:
            # Solana without the bytes: the blockhash (hence the expiry) is unknown. Left open, loudly.
            log.error("payout %s (%s): not on chain, signed bytes gone; left open", p.id, p.tx_id)
            report.errors.append(f"payout {p.id}: not on chain, signed bytes unavailable")
            return
        if self.provider.superseded(signed):
            self._mark(service.mark_failed, p.id,
                       f"transaction {p.tx_id} can never land (nonce {p.nonce} taken by another transaction "
                       "or blockhash expired)")
            report.reversed += 1
            log.warning("payout %s superseded on chain; amount returned to worker %s", p.id, p.worker_id)
            return
        gap = self.provider.blocking_gap(signed, held_nonces=held)
        for nonce in gap:
            self.provider.broadcast(self.provider.sign_filler(nonce=nonce))
            report.fillers += 1
            log.warning("filled nonce gap at %s below payout %s", nonce, p.id)
        if raw is None:
            # The bytes are missing: take the nonce with a zero-value transfer so that the payout provably
            # lands or provably never does; the next run settles which.
            assert p.nonce is not None
            self.provider.broadcast(self.provider.sign_filler(nonce=p.nonce))
            report.fillers += 1
            log.warning("payout %s: signed bytes unavailable; nonce %s taken by a zero-value transfer",
                        p.id, p.nonce)
            return
        self.provider.broadcast(signed)
        if p.status == "pending":
            self._mark(service.mark_sent, p.id)
        report.resent += 1
        log.info("payout %s re-broadcast (same bytes, %s)", p.id, p.tx_id)

    def _next_nonce(self) -> int | None:
        chain = self.provider.next_nonce()
        if chain is None:
            return None
        recorded = [p.nonce for p in self._open_payouts() if p.nonce is not None]
        return max([chain, *(n + 1 for n in recorded)])

    def _sign_and_send(self, payout_id: int, to: str, amount: int, report: RunReport) -> bool:
        """False when the broadcast's outcome is unknown (the caller then stops creating payouts)."""
        try:
            signed = self.provider.sign_payout(to=to, amount=amount, nonce=self._next_nonce())
        except InvalidRequest as exc:
            # Refused before anything was signed (bad address, a recipient contract that rejects the
            # transfer): nothing can be on chain, so the amount safely goes back to the worker.
            self._mark(service.mark_failed, payout_id, f"cannot pay {to}: {exc.message}")
            report.reversed += 1
            log.warning("payout %s refused before signing: %s", payout_id, exc.message)
            return True
        try:
            self._record_signed(payout_id, signed)  # committed BEFORE broadcast
        except Conflict as exc:
            # The payout changed under us (reversed because its worker was frozen meanwhile): these bytes
            # were never recorded, so they are never broadcast and nothing is paid.
            report.errors.append(f"payout {payout_id}: {exc.message}")
            log.warning("payout %s not sent: %s", payout_id, exc.message)
            return True
        try:
            self.provider.broadcast(signed)
        except ChainError as exc:
            # Maybe sent, maybe not: the recorded tx id lets the next run find out.
            report.errors.append(f"payout {payout_id}: {exc}")
            log.warning("payout %s broadcast unconfirmed (%s); will reconcile by tx id %s", payout_id, exc,
                        signed.tx_id)
            return False
        self._mark(service.mark_sent, payout_id)
        report.broadcast += 1
        log.info("payout %s sent: %s base units to %s in %s", payout_id, amount, to, signed.tx_id)
        return True

    def _sign_unsigned(self, report: RunReport) -> None:
        """Payouts written but never signed (a crash or RPC failure right after create_payout)."""
        for p in self._open_payouts():
            if p.tx_id is None and not self._sign_and_send(p.id, p.to_address, p.amount, report):
                return

    def _create_due(self, report: RunReport) -> None:
        self.provider.next_nonce()  # the node must answer before any worker is debited
        with self.sessions.begin() as s:
            due = service.workers_due(s, self.threshold)
        for worker_id, wallet, amount in due:
            try:
                to = self.provider.validate_address(wallet)
            except InvalidRequest:
                report.errors.append(f"worker {worker_id}: invalid wallet {wallet!r}")
                log.error("worker %s has an invalid payout wallet %r; not paid", worker_id, wallet)
                continue
            try:
                with self.sessions.begin() as s:
                    payout_id = service.create_payout(s, worker_id=worker_id, amount=amount, to_address=to).id
            except Conflict as exc:  # a payout is already open for this worker
                log.info("worker %s not paid this run: %s", worker_id, exc.message)
                continue
            report.created += 1
            if not self._sign_and_send(payout_id, to, amount, report):
                return  # the node is flaky: no new payouts behind one whose fate is unknown
