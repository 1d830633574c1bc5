"""The only code that moves money. Every function takes a SQLAlchemy ``Session`` first and never commits
(the caller owns the transaction: ``with session_scope(engine) as s: ...``). Amounts are ``int`` base units.

Concurrency, in one place:
- Every mutating function runs inside a SAVEPOINT, so a refusal (402, 409, ...) leaves the caller's
  transaction usable and nothing of the refused operation behind.
- Each money movement is a journal transaction with a unique idempotency key, inserted with
  ``ON CONFLICT DO NOTHING``: a concurrent duplicate waits for the first one's COMMIT and then does nothing.
- Rows are locked in one order to avoid deadlocks: the business row (hold / payout / deposit key) first,
  then the journal key, then the accounts involved, by ascending id.
- Operations are idempotent, so a caller may retry a transaction that PostgreSQL aborted (deadlock,
  serialization failure); LedgerBilling does.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from azu.billing import economics
from azu.billing.base import JobNotSettled
from azu.billing.ledger.models import (
    OPEN_PAYOUT_STATUSES,
    PAYOUT_TRANSITIONS,
    Account,
    AccountKind,
    Deposit,
    Hold,
    HoldStatus,
    JobUsage,
    JournalEntry,
    JournalTransaction,
    Payout,
    PayoutStatus,
    Verdict,
    VerdictOutcome,
    Worker,
)
from azu.errors import Conflict, InvalidRequest, NotFound, PaymentRequired

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- accounts


def _account(session: Session, kind: AccountKind, owner: str = "") -> Account:
    if kind.has_owner and not owner:
        raise InvalidRequest(f"a {kind.value} account needs an owner")
    query = select(Account).where(Account.kind == kind.value, Account.owner == owner)
    account = session.execute(query).scalar_one_or_none()
    if account is None:
        # Two requests may create the same account at once: the loser's insert becomes a no-op.
        session.execute(
            pg_insert(Account)
            .values(kind=kind.value, owner=owner)
            .on_conflict_do_nothing(index_elements=["kind", "owner"])
        )
        account = session.execute(query).scalar_one()
    return account


def user_account(session: Session, address: str) -> Account:
    """The account of a wallet ``address`` (already normalized by the payment provider)."""
    return _account(session, AccountKind.USER, address)


def worker_account(session: Session, worker_id: str) -> Account:
    _ensure_worker(session, worker_id)
    return _account(session, AccountKind.WORKER, worker_id)


def platform_account(session: Session) -> Account:
    return _account(session, AccountKind.PLATFORM)


def chain_account(session: Session) -> Account:
    """The outside world. Its balance is minus what the platform holds on behalf of everyone."""
    return _account(session, AccountKind.CHAIN)


def payouts_account(session: Session) -> Account:
    """Payouts debited from workers and not yet confirmed on chain."""
    return _account(session, AccountKind.PAYOUTS)


def holds_account(session: Session) -> Account:
    """What running jobs have reserved from their users."""
    return _account(session, AccountKind.HOLDS)


def withheld_account(session: Session, worker_id: str) -> Account:
    """Earnings taken back from ``worker_id`` for jobs that failed verification."""
    _ensure_worker(session, worker_id)
    return _account(session, AccountKind.WITHHELD, worker_id)


def balance(session: Session, account: Account | int) -> int:
    """The committed-or-own-transaction balance, read fresh (triggers update it behind the ORM's back)."""
    account_id = account if isinstance(account, int) else account.id
    return session.execute(select(Account.balance).where(Account.id == account_id)).scalar_one()


def user_balance(session: Session, address: str) -> int:
    found = session.execute(
        select(Account.balance).where(Account.kind == AccountKind.USER.value, Account.owner == address)
    ).scalar_one_or_none()
    return found or 0


def held_for(session: Session, address: str) -> int:
    """Sum of the holds of this user's running jobs."""
    total = session.execute(
        select(func.coalesce(func.sum(Hold.hold_amount), 0)).where(
            Hold.user_address == address, Hold.status == HoldStatus.HELD.value
        )
    ).scalar_one()
    return int(total)


def _ensure_worker(session: Session, worker_id: str) -> None:
    if not worker_id:
        raise InvalidRequest("worker id must not be empty", param="worker_id")
    if session.get(Worker, worker_id) is None:
        session.execute(pg_insert(Worker).values(id=worker_id).on_conflict_do_nothing(index_elements=["id"]))


def set_worker_wallet(session: Session, worker_id: str, address: str) -> Worker:
    """Where the worker's payouts go (``address`` already normalized by the payment provider)."""
    with session.begin_nested():
        worker_account(session, worker_id)
        session.execute(update(Worker).where(Worker.id == worker_id).values(wallet_address=address))
    worker = session.get(Worker, worker_id, populate_existing=True)
    assert worker is not None
    return worker


# --------------------------------------------------------------------------------------------- posting


def _post(
    session: Session, *, key: str, kind: str, legs: Iterable[tuple[Account, int]], memo: str | None = None
) -> int | None:
    """Write one balanced journal transaction; return its id, or None if ``key`` was already posted.

    Refuses (PaymentRequired) to take a non-chain account below zero; the database's CHECK is the backstop.
    """
    by_account: dict[int, int] = defaultdict(int)
    kinds: dict[int, str] = {}
    for account, amount in legs:
        by_account[account.id] += amount
        kinds[account.id] = account.kind
    moves = {account_id: amount for account_id, amount in by_account.items() if amount != 0}
    if sum(moves.values()) != 0:
        raise AssertionError(f"unbalanced journal transaction {key}: {moves}")

    txn_id = session.execute(
        pg_insert(JournalTransaction)
        .values(idempotency_key=key, kind=kind, memo=memo)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(JournalTransaction.id)
    ).scalar_one_or_none()
    if txn_id is None:
        return None
    if not moves:
        return txn_id

    ordered = sorted(moves)
    balances = _lock_balances(session, ordered)
    for account_id in ordered:
        after = balances[account_id] + moves[account_id]
        if after < 0 and kinds[account_id] != AccountKind.CHAIN.value:
            raise PaymentRequired(
                f"{kinds[account_id]} account {account_id} holds {balances[account_id]} base units; "
                f"{-moves[account_id]} needed"
            )
    session.execute(
        pg_insert(JournalEntry),
        [{"transaction_id": txn_id, "account_id": a, "amount": moves[a]} for a in ordered],
    )
    return txn_id


# --------------------------------------------------------------------------------------------- deposits


def credit_deposit(
    session: Session, *, tx_id: str, sender: str, amount: int, refuse_replay: bool = False
) -> Deposit:
    """Credit ``amount`` to ``sender``'s account, once per chain transaction ``tx_id``.

    A second call with the same ``tx_id`` changes nothing and returns the first deposit, or raises
    Conflict when ``refuse_replay`` (the API answers a replayed transaction with 409).
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidRequest(f"a deposit must carry a positive integer amount, got {amount!r}")
    if not tx_id or not sender:
        raise InvalidRequest("a deposit needs a transaction id and a sender")
    with session.begin_nested():
        user = user_account(session, sender)
        chain = chain_account(session)
        # The journal key is the lock: a concurrent credit of the same tx waits on it, then finds it taken.
        deposit_id = _insert_deposit(
            session, tx_id=tx_id, sender=sender, amount=amount, user=user, chain=chain
        )
    existing = session.execute(
        select(Deposit).where(Deposit.tx_id == tx_id).execution_options(populate_existing=True)
    ).scalar_one()
    if deposit_id is None:
        if existing.sender != sender or existing.amount != amount:
            log.warning("deposit %s replayed with different sender/amount; the first credit stands", tx_id)
        if refuse_replay:
            raise Conflict(f"transaction {tx_id} was already credited to {existing.sender}", param="tx_sig")
    return existing


def _insert_deposit(
    session: Session, *, tx_id: str, sender: str, amount: int, user: Account, chain: Account
) -> int | None:
    # Journal first (its unique key serializes duplicates), then the deposit row pointing at it.
    txn_id = _post(
        session,
        key=f"deposit:{tx_id}",
        kind="deposit",
        legs=[(chain, -amount), (user, amount)],
        memo=f"deposit {tx_id} from {sender}",
    )
    if txn_id is None:
        return None
    return session.execute(
        pg_insert(Deposit)
        .values(tx_id=tx_id, sender=sender, amount=amount, account_id=user.id, journal_transaction_id=txn_id)
        .returning(Deposit.id)
    ).scalar_one()


# -------------------------------------------------------------------------------------------- holds


def _locked_hold(session: Session, job_id: str) -> Hold:
    hold = session.execute(
        select(Hold).where(Hold.id == job_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if hold is None:
        raise NotFound(f"no job {job_id!r} in the ledger", param="job_id")
    return hold


def place_hold(
    session: Session,
    *,
    job_id: str,
    user_address: str,
    amount: int,
    model_id: str | None = None,
    price: int | None = None,
) -> Hold:
    """Reserve ``amount`` (the most the job can cost) from the user. Idempotent per ``job_id``.

    Raises PaymentRequired (with both amounts) when the user's balance cannot cover it; nothing is written.
    ``price`` (per token-layer) is fixed on the hold now, so settlement charges what the user accepted.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise InvalidRequest(f"a hold must be a non-negative integer, got {amount!r}")
    unit = economics.price_per_token_layer() if price is None else price
    with session.begin_nested():
        inserted = session.execute(
            pg_insert(Hold)
            .values(id=job_id, user_address=user_address, model_id=model_id, hold_amount=amount, price=unit)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(Hold.id)
        ).scalar_one_or_none()
        if inserted is None:
            hold = _locked_hold(session, job_id)
            if hold.user_address != user_address or hold.hold_amount != amount:
                raise Conflict(f"job {job_id!r} already exists with another user or hold", param="job_id")
            return hold
        user = user_account(session, user_address)
        available = user_balance(session, user_address)
        if available < amount:
            raise PaymentRequired(
                f"insufficient balance: this job may cost up to {amount} base units "
                f"and {user_address} has {available}; deposit at least {amount - available} more"
            )
        _post(
            session,
            key=f"job:{job_id}:hold",
            kind="hold",
            legs=[(user, -amount), (holds_account(session), amount)],
            memo=f"hold for job {job_id}",
        )
    return _hold(session, job_id)


def _hold(session: Session, job_id: str) -> Hold:
    hold = session.execute(
        select(Hold).where(Hold.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if hold is None:
        raise NotFound(f"no job {job_id!r} in the ledger", param="job_id")
    return hold


def settle_hold(session: Session, *, job_id: str, usage: dict[str, int], price: int | None = None) -> Hold:
    """Charge actual usage, credit each worker its share of 80 %, the platform 20 %, return the rest.

    ``usage`` maps worker id -> token-layers it ran; ``price`` defaults to the one fixed at hold time.
    The charge is capped at the hold (see azu.billing.economics.split_charge). One transaction; settling a
    hold that is already settled or released changes nothing.
    """
    with session.begin_nested():
        hold = _locked_hold(session, job_id)  # concurrent settlements queue here; the first one wins
        if hold.status != HoldStatus.HELD.value:
            if hold.status == HoldStatus.RELEASED.value:
                log.warning("job %s was released before it was settled; not charging", job_id)
            return hold
        result = economics.split_charge(usage, hold.price if price is None else price, cap=hold.hold_amount)
        legs: list[tuple[Account, int]] = [
            (holds_account(session), -hold.hold_amount),
            (user_account(session, hold.user_address), hold.hold_amount - result.charge),
            (platform_account(session), result.platform),
        ]
        for worker_id in sorted(result.workers):
            legs.append((worker_account(session, worker_id), result.workers[worker_id]))
        _post(session, key=f"job:{job_id}:settle", kind="settle", legs=legs, memo=f"settle job {job_id}")
        session.add_all(
            JobUsage(job_id=job_id, worker_id=w, token_layers=usage[w], credited=result.workers[w])
            for w in sorted(usage)
        )
        hold.status = HoldStatus.SETTLED.value
        hold.charged = result.charge
        hold.finished_at = func.now()
        session.flush()
    return _hold(session, job_id)


def release_hold(session: Session, *, job_id: str) -> Hold:
    """Give the whole hold back (the job failed before producing anything). Idempotent."""
    with session.begin_nested():
        hold = _locked_hold(session, job_id)
        if hold.status != HoldStatus.HELD.value:
            return hold
        _post(
            session,
            key=f"job:{job_id}:release",
            kind="release",
            legs=[
                (holds_account(session), -hold.hold_amount),
                (user_account(session, hold.user_address), hold.hold_amount),
            ],
            memo=f"release job {job_id}",
        )
        hold.status = HoldStatus.RELEASED.value
        hold.charged = 0
        hold.finished_at = func.now()
        session.flush()
    return _hold(session, job_id)


def job_usage(session: Session, job_id: str) -> dict[str, tuple[int, int]]:
    """worker id -> (token-layers, credited) as recorded at settlement."""
    rows = session.execute(
        select(JobUsage.worker_id, JobUsage.token_layers, JobUsage.credited).where(JobUsage.job_id == job_id)
    ).all()
    return {w: (tl, credited) for w, tl, credited in rows}


# --------------------------------------------------------------------------------------------- payouts


def workers_due(session: Session, threshold: int) -> list[tuple[str, str, int]]:
    """(worker id, wallet, whole balance) for each worker with a wallet, a balance >= ``threshold``, no
    payout already in flight, and not frozen."""
    if threshold <= 0:
        raise InvalidRequest("the payout threshold must be positive")
    open_payout = exists().where(Payout.worker_id == Worker.id, Payout.status.in_(OPEN_PAYOUT_STATUSES))
    rows = session.execute(
        select(Worker.id, Worker.wallet_address, Account.balance)
        .join(Account, (Account.kind == AccountKind.WORKER.value) & (Account.owner == Worker.id))
        .where(
            Worker.wallet_address.is_not(None),
            Worker.frozen_reason.is_(None),
            Account.balance >= threshold,
            ~open_payout,
        )
        .order_by(Worker.id)
    ).all()
    return [(w, wallet, amount) for w, wallet, amount in rows if wallet]


def _locked_payout(session: Session, payout_id: int) -> Payout:
    payout = session.execute(
        select(Payout)
        .where(Payout.id == payout_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if payout is None:
        raise NotFound(f"no payout {payout_id}", param="payout_id")
    return payout


def _move(payout: Payout, to: PayoutStatus) -> bool:
    """Apply a status change allowed by PAYOUT_TRANSITIONS; False if already there; Conflict otherwise."""
    current = PayoutStatus(payout.status)
    if current == to:
        return False
    if to not in PAYOUT_TRANSITIONS[current]:
        raise Conflict(
            f"payout {payout.id} is {current.value}; it cannot become {to.value}", param="payout_id"
        )
    payout.status = to.value
    return True


def create_payout(session: Session, *, worker_id: str, amount: int, to_address: str) -> Payout:
    """Debit the worker into the payouts-in-flight account and record a pending payout, in one transaction.

    Call it (and commit) before anything is signed or sent. One payout per worker may be in flight:
    a second one raises Conflict (the database's partial unique index is the backstop), and so does a
    payout to a frozen worker.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidRequest(f"a payout must be a positive integer amount, got {amount!r}")
    if not to_address:
        raise InvalidRequest("a payout needs a destination address", param="to_address")
    try:
        with session.begin_nested():
            worker = worker_account(session, worker_id)
            # FOR SHARE: a concurrent freeze_worker (which updates the row) waits for this payout or
            # happens before it, never in between.
            frozen = session.execute(
                select(Worker.frozen_reason).where(Worker.id == worker_id).with_for_update(read=True)
            ).scalar_one()
            if frozen is not None:
                raise Conflict(f"worker {worker_id}'s payouts are frozen: {frozen}", param="worker_id")
            payout = Payout(worker_id=worker_id, amount=amount, to_address=to_address)
            session.add(payout)
            session.flush()  # the partial unique index refuses a second open payout here
            _post(
                session,
                key=f"payout:{payout.id}:debit",
                kind="payout",
                legs=[(worker, -amount), (payouts_account(session), amount)],
                memo=f"payout {payout.id} to {to_address}",
            )
    except IntegrityError as exc:
        if "uq_payouts_one_open_per_worker" in str(exc.orig):
            raise Conflict(f"worker {worker_id} already has a payout in flight", param="worker_id") from exc
        raise
    return _payout(session, payout.id)


def _payout(session: Session, payout_id: int) -> Payout:
    payout = session.get(Payout, payout_id, populate_existing=True)
    if payout is None:
        raise NotFound(f"no payout {payout_id}", param="payout_id")
    return payout


def record_signed(
    session: Session, payout_id: int, *, tx_id: str, nonce: int | None, raw: bytes | None = None
) -> Payout:
    """Remember the signed transaction (hash, nonce, and its bytes when given) BEFORE it is broadcast, so a
    crash after sending can be reconciled by tx id and the same bytes resent. Only while pending; the same
    tx again is a no-op (it may add the bytes); a different tx for a payout that already has one raises
    Conflict (the first may be on the wire: reconcile it, mark_failed once it provably cannot land, and pay
    with a new payout)."""
    if not tx_id:
        raise InvalidRequest("tx_id must not be empty", param="tx_id")
    with session.begin_nested():
        payout = _locked_payout(session, payout_id)
        if payout.tx_id is not None:
            if payout.tx_id != tx_id or payout.nonce != nonce:
                raise Conflict(f"payout {payout_id} already has signed tx {payout.tx_id}", param="tx_id")
            if raw is not None and payout.raw_tx is None:
                payout.raw_tx = raw
                session.flush()
            return payout
        if payout.status != PayoutStatus.PENDING.value:
            raise Conflict(f"payout {payout_id} is {payout.status}; only a pending payout can be signed")
        payout.tx_id = tx_id
        payout.nonce = nonce
        payout.raw_tx = raw
        session.flush()
    return _payout(session, payout_id)


def mark_sent(session: Session, payout_id: int) -> Payout:
    """pending -> sent (broadcast). Idempotent."""
    with session.begin_nested():
        payout = _locked_payout(session, payout_id)
        if payout.tx_id is None:
            raise Conflict(f"payout {payout_id} has no recorded signed tx; record_signed comes first")
        if _move(payout, PayoutStatus.SENT):
            payout.sent_at = func.now()
        session.flush()
    return _payout(session, payout_id)


def mark_confirmed(session: Session, payout_id: int) -> Payout:
    """sent -> confirmed: the money left the system (payouts-in-flight -> outside chain). Idempotent."""
    with session.begin_nested():
        payout = _locked_payout(session, payout_id)
        if _move(payout, PayoutStatus.CONFIRMED):
            _post(
                session,
                key=f"payout:{payout_id}:confirm",
                kind="payout_confirm",
                legs=[(payouts_account(session), -payout.amount), (chain_account(session), payout.amount)],
                memo=f"payout {payout_id} confirmed as {payout.tx_id}",
            )
            payout.finished_at = func.now()
        session.flush()
    return _payout(session, payout_id)


def mark_failed(session: Session, payout_id: int, reason: str) -> Payout:
    """pending|sent -> failed -> reversed: the amount goes back to the worker. Only for a payout that can
    never land on chain. Idempotent; refused (Conflict) for a confirmed payout: that would pay twice."""
    with session.begin_nested():
        payout = _locked_payout(session, payout_id)
        if payout.status == PayoutStatus.REVERSED.value:
            return payout
        _move(payout, PayoutStatus.FAILED)
        payout.failure_reason = reason[:2000]
        _post(
            session,
            key=f"payout:{payout_id}:reverse",
            kind="payout_reverse",
            legs=[
                (payouts_account(session), -payout.amount),
                (worker_account(session, payout.worker_id), payout.amount),
            ],
            memo=f"payout {payout_id} failed: {reason[:200]}",
        )
        _move(payout, PayoutStatus.REVERSED)
        payout.finished_at = func.now()
        session.flush()
    return _payout(session, payout_id)


def payouts_in(session: Session, *statuses: PayoutStatus | str) -> list[Payout]:
    """Payouts in any of ``statuses`` (all payouts when none is given), oldest first."""
    query = select(Payout).order_by(Payout.id)
    if statuses:
        query = query.where(Payout.status.in_([PayoutStatus(s).value for s in statuses]))
    return list(session.execute(query).scalars())


# ---------------------------------------------------------------------------------------- verification

MAX_EVIDENCE_BYTES = 16 * 1024  # a verdict's evidence is a few numbers and digests, not data
MAX_REASON_CHARS = 2000


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON, so evidence never costs a verdict: numpy/torch scalars as their number
    (``.item()``), non-finite floats as text ("nan", "inf": JSON and jsonb have no NaN, and a verifier's "max
    difference" can be one), anything else unknown as its ``str``."""
    if hasattr(value, "item") and not isinstance(value, dict | list | tuple | str | bytes):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):  # not a scalar (numpy: ValueError, torch: RuntimeError)
            return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)


def _evidence(evidence: Any) -> dict[str, Any]:
    if not isinstance(evidence, dict):
        raise InvalidRequest(
            f"evidence must be a JSON object, got {type(evidence).__name__}", param="evidence"
        )
    safe = _json_safe(evidence)
    size = len(json.dumps(safe, allow_nan=False).encode())
    if size > MAX_EVIDENCE_BYTES:
        raise InvalidRequest(f"evidence is {size} bytes; at most {MAX_EVIDENCE_BYTES}", param="evidence")
    return safe  # type: ignore[no-any-return]


def _lock_balances(session: Session, account_ids: Iterable[int]) -> dict[int, int]:
    """Lock the accounts in ascending id order (every posting locks in that order: no deadlock between
    two postings) and return their balances."""
    ids = sorted(set(account_ids))
    return dict(
        session.execute(
            select(Account.id, Account.balance)
            .where(Account.id.in_(ids))
            .order_by(Account.id)
            .with_for_update()
        ).all()
    )


def _verdict(session: Session, job_id: str, worker_id: str) -> Verdict | None:
    return session.execute(
        select(Verdict)
        .where(Verdict.job_id == job_id, Verdict.worker_id == worker_id)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def withhold_job_earnings(
    session: Session, *, job_id: str, worker_id: str, reason: str, evidence: dict[str, Any]
) -> Verdict:
    """The verifier found ``worker_id``'s numbers for ``job_id`` wrong: take its credit back, refund the user,
    keep the verdict. Idempotent per (job, worker): a second call returns the first verdict, moving nothing.

    Two journal transactions, each balanced and keyed:

    - ``withhold`` (key ``job:<job>:withhold:<worker>``): the worker's credit for the job (JobUsage.credited)
      from its worker account to its withheld account. If it was already paid out (the balance is below the
      credit) only the balance is taken; the rest is the verdict's ``shortfall``.
    - ``refund`` (key ``job:<job>:refund``, once per job however many of its workers are found wrong): the
      job's whole charge from the platform account back to the user. The platform carries it (its own 20 %
      and the workers' share: the withheld money stays apart for an operator to rule on), as far as its
      balance goes; a partial refund says so in its memo. No account goes below zero.

    Raises NotFound for a job the ledger never held, JobNotSettled while its bill is still open (retry after
    settlement). A worker with no usage recorded for the job is credited 0: the verdict is still kept.

    Locks: the hold row first (every verdict of the job queues there), then the four accounts in id order;
    the journal keys come after the accounts here, which is safe because both keys belong to this job and
    the hold lock already serializes everything that posts them.
    """
    reason = (reason or "").strip()[:MAX_REASON_CHARS]
    if not reason:
        raise InvalidRequest("a verdict needs a reason", param="reason")
    safe_evidence = _evidence(evidence)
    with session.begin_nested():
        hold = _locked_hold(session, job_id)  # verdicts of one job queue here: one refund, in order
        existing = _verdict(session, job_id, worker_id)
        if existing is not None:
            return existing
        if hold.status == HoldStatus.HELD.value:
            raise JobNotSettled(f"job {job_id} is not settled yet; its verdict waits for settlement",
                                param="job_id")
        usage = session.get(JobUsage, (job_id, worker_id), populate_existing=True)
        credit = usage.credited if usage is not None else 0
        worker = worker_account(session, worker_id)
        withheld_to = withheld_account(session, worker_id)
        platform = platform_account(session)
        user = user_account(session, hold.user_address)
        balances = _lock_balances(session, (a.id for a in (worker, withheld_to, platform, user)))

        withheld = min(credit, balances[worker.id])
        shortfall = credit - withheld
        memo = f"withhold job {job_id} from worker {worker_id} ({credit} credited): {reason}"
        if usage is None:
            memo += "; no credit recorded for this worker"
        if shortfall:
            memo += f"; {shortfall} already paid out, not recovered"
        withhold_txn = _post(
            session,
            key=f"job:{job_id}:withhold:{worker_id}",
            kind="withhold",
            legs=[(worker, -withheld), (withheld_to, withheld)],
            memo=memo[:MAX_REASON_CHARS],
        )
        if withhold_txn is None:  # the key is only ever posted together with its verdict row
            raise AssertionError(f"withhold of job {job_id} from {worker_id} posted without a verdict")

        refund_key = f"job:{job_id}:refund"
        already_refunded = session.execute(
            select(exists().where(JournalTransaction.idempotency_key == refund_key))
        ).scalar_one()
        refunded, refund_txn = 0, None
        if not already_refunded:
            charge = hold.charged or 0
            refunded = min(charge, balances[platform.id])
            memo = (f"refund job {job_id} to {hold.user_address}: {refunded} of {charge} charged; "
                    f"worker {worker_id} failed verification: {reason}")
            if refunded < charge:
                memo += f"; platform balance short by {charge - refunded}, not refunded"
                log.error("job %s: refunded %d of %d; the platform account cannot cover the rest",
                          job_id, refunded, charge)
            refund_txn = _post(
                session,
                key=refund_key,
                kind="refund",
                legs=[(platform, -refunded), (user, refunded)],
                memo=memo[:MAX_REASON_CHARS],
            )
        verdict = Verdict(
            job_id=job_id,
            worker_id=worker_id,
            outcome=VerdictOutcome.FAILED.value,
            reason=reason,
            evidence=safe_evidence,
            credited=credit,
            withheld=withheld,
            shortfall=shortfall,
            refunded=refunded,
            withhold_transaction_id=withhold_txn,
            refund_transaction_id=refund_txn,
        )
        session.add(verdict)
        session.flush()
    log.warning("job %s: worker %s failed verification (%s); withheld %d of %d, refunded %d",
                job_id, worker_id, reason, withheld, credit, refunded)
    found = _verdict(session, job_id, worker_id)
    assert found is not None
    return found


def verdicts(session: Session, *, job_id: str | None = None, worker_id: str | None = None) -> list[Verdict]:
    """Verdicts (of a job, of a worker, or all), oldest first."""
    query = select(Verdict).order_by(Verdict.id)
    if job_id is not None:
        query = query.where(Verdict.job_id == job_id)
    if worker_id is not None:
        query = query.where(Verdict.worker_id == worker_id)
    return list(session.execute(query).scalars())


def freeze_worker(session: Session, *, worker_id: str, reason: str) -> Worker:
    """Stop ``worker_id``'s payouts until ``unfreeze_worker``. Idempotent: a frozen worker keeps its first
    reason. A payout of it that was written but never signed is reversed (it cannot be on chain); one
    already signed may be on the wire and is left to finish."""
    reason = (reason or "").strip()[:MAX_REASON_CHARS]
    if not reason:
        raise InvalidRequest("freezing a worker needs a reason", param="reason")
    with session.begin_nested():
        worker_account(session, worker_id)
        frozen = session.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.frozen_reason.is_(None))
            .values(frozen_reason=reason, frozen_at=func.now())
            .returning(Worker.id)
        ).scalar_one_or_none()
        if frozen is not None:
            log.warning("worker %s frozen: %s", worker_id, reason)
            unsigned = session.execute(
                select(Payout.id).where(
                    Payout.worker_id == worker_id,
                    Payout.status == PayoutStatus.PENDING.value,
                    Payout.tx_id.is_(None),
                )
            ).scalars().all()
            for payout_id in unsigned:
                mark_failed(session, payout_id, f"worker frozen before signing: {reason}")
    worker = session.get(Worker, worker_id, populate_existing=True)
    assert worker is not None
    return worker


def unfreeze_worker(session: Session, *, worker_id: str) -> Worker:
    """An operator's ruling: pay the worker again (NotFound for a worker the ledger does not know)."""
    with session.begin_nested():
        cleared = session.execute(
            update(Worker).where(Worker.id == worker_id).values(frozen_reason=None, frozen_at=None)
            .returning(Worker.id)
        ).scalar_one_or_none()
        if cleared is None:
            raise NotFound(f"no worker {worker_id!r} in the ledger", param="worker_id")
    worker = session.get(Worker, worker_id, populate_existing=True)
    assert worker is not None
    return worker
