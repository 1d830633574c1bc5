"""Ledger tables (SQLAlchemy 2 typed models).

Money moves only as a balanced journal transaction: a row in ``journal_transactions`` (with a unique
idempotency key, so replaying an operation cannot post it twice) and two or more signed rows in
``journal_entries`` that sum to zero. Every account has a ``balance`` column, and the database keeps it
honest by itself (the triggers live in the first migration, alembic/versions/0001_ledger.py):

- an AFTER INSERT trigger on journal_entries adds each entry's amount to its account's balance, in the same
  transaction, so no code path can write an entry without moving the balance or move a balance without an
  entry (a second trigger refuses any other change of ``accounts.balance``);
- ``CHECK (balance >= 0 OR kind = 'chain')`` then refuses, inside that transaction, any entry that would take
  an account below zero. Only the "outside chain" account may go negative: it is the counterpart of money that
  entered the system (deposits) minus money that left it (confirmed payouts), so -balance(chain) is what the
  platform owes in total;
- a deferred constraint trigger refuses at COMMIT a journal transaction whose entries do not sum to zero, and
  entries can be neither updated nor deleted (corrections are new transactions).

Hence the sum of all balances is always zero, and each balance equals the sum of its entries.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so Alembic autogenerate and downgrades can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ADDRESS_LEN = 128  # fits a 0x EVM address (42) and a base58 Solana key (≤ 44) with room to spare
TX_ID_LEN = 128  # 0x + 64 hex (EVM) or a base58 signature (≤ 88)


class Amount(TypeDecorator[int]):
    """An integer amount in base units (wei, lamports): NUMERIC(78, 0) in PostgreSQL, ``int`` in Python.

    78 digits hold any uint256. Never a float: a Decimal with a fraction is refused on the way in.
    """

    impl = Numeric(78, 0)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise TypeError(f"amounts are integers in base units, got {type(value).__name__}")
        dec = Decimal(value)
        if dec != dec.to_integral_value():
            raise TypeError(f"amounts are integers in base units, got {value}")
        return dec

    def process_result_value(self, value: Any, dialect: Any) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


def _in(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class AccountKind(enum.StrEnum):
    USER = "user"  # a wallet that deposited / pays for jobs; owner = its normalized address
    WORKER = "worker"  # owner = worker id
    PLATFORM = "platform"  # the platform's 20%
    CHAIN = "chain"  # the outside world: money deposited in / paid out; the only account allowed below zero
    PAYOUTS = "payouts"  # payouts debited from workers, signed/sent, not yet confirmed on chain
    HOLDS = "holds"  # the most each running job can cost, reserved from its user
    # A worker's earnings taken back for jobs whose numbers failed verification; owner = worker id. Kept
    # apart (not paid out, not spent) so an operator can see, and if need be return, what was withheld.
    WITHHELD = "withheld"

    @property
    def has_owner(self) -> bool:
        return self in OWNED_ACCOUNT_KINDS


OWNED_ACCOUNT_KINDS = (AccountKind.USER, AccountKind.WORKER, AccountKind.WITHHELD)


class HoldStatus(enum.StrEnum):
    """Where a job's hold stands (not the job's own status, which lives in Redis)."""

    HELD = "held"  # reserved from the user while the job may still run
    SETTLED = "settled"  # the job's usage was charged and the rest given back
    RELEASED = "released"  # given back whole (the job produced nothing)


class PayoutStatus(enum.StrEnum):
    PENDING = "pending"  # worker debited into the payouts account; maybe signed (tx id recorded), not sent
    SENT = "sent"  # broadcast
    CONFIRMED = "confirmed"  # on chain with enough confirmations: the money left the system
    FAILED = "failed"  # will never land (momentary: mark_failed reverses in the same transaction)
    REVERSED = "reversed"  # the amount went back to the worker


# The one place that says which payout moves exist. A confirmed payout can never fail or be reversed (that
# would pay the worker twice), and a reversed one can never be confirmed.
PAYOUT_TRANSITIONS: dict[PayoutStatus, frozenset[PayoutStatus]] = {
    PayoutStatus.PENDING: frozenset({PayoutStatus.SENT, PayoutStatus.FAILED}),
    PayoutStatus.SENT: frozenset({PayoutStatus.CONFIRMED, PayoutStatus.FAILED}),
    PayoutStatus.FAILED: frozenset({PayoutStatus.REVERSED}),
    PayoutStatus.CONFIRMED: frozenset(),
    PayoutStatus.REVERSED: frozenset(),
}
OPEN_PAYOUT_STATUSES = (PayoutStatus.PENDING.value, PayoutStatus.SENT.value)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner", name="uq_accounts_kind_owner"),
        CheckConstraint(_in("kind", [k.value for k in AccountKind]), name="kind_known"),
        CheckConstraint("balance >= 0 OR kind = 'chain'", name="balance_not_negative"),
        # user/worker/withheld accounts name their owner; the singleton system accounts use ''
        CheckConstraint(f"({_in('kind', [k.value for k in OWNED_ACCOUNT_KINDS])}) = (owner <> '')",
                        name="owner_matches_kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(ADDRESS_LEN), server_default="")
    balance: Mapped[int] = mapped_column(Amount, server_default="0")
    created_at: Mapped[datetime] = _now()


class JournalTransaction(Base):
    __tablename__ = "journal_transactions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))  # deposit, hold, settle, release, payout, ...
    memo: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


class JournalEntry(Base):
    __tablename__ = "journal_entries"
    __table_args__ = (CheckConstraint("amount <> 0", name="amount_not_zero"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(Amount)  # signed: + credits the account, - debits it


class Deposit(Base):
    __tablename__ = "deposits"
    __table_args__ = (CheckConstraint("amount > 0", name="amount_positive"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tx_id: Mapped[str] = mapped_column(String(TX_ID_LEN), unique=True)  # credited once per chain transaction
    sender: Mapped[str] = mapped_column(String(ADDRESS_LEN), index=True)
    amount: Mapped[int] = mapped_column(Amount)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    journal_transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"))
    created_at: Mapped[datetime] = _now()


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(ADDRESS_LEN), primary_key=True)
    wallet_address: Mapped[str | None] = mapped_column(String(ADDRESS_LEN))
    # Set by freeze_worker (repeated verification failures): no payout until an operator clears it.
    frozen_reason: Mapped[str | None] = mapped_column(Text)
    frozen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class Hold(Base):
    """What one job may cost, reserved from its user at submit and settled (or released) when it ends.

    Keyed by the job id. The table keeps its first name, ``jobs``: renaming it would only churn the
    constraint and index names of a live ledger.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", [s.value for s in HoldStatus]), name="status_known"),
        CheckConstraint("hold_amount >= 0", name="hold_not_negative"),
        CheckConstraint("price >= 0", name="price_not_negative"),
        CheckConstraint(
            "charged IS NULL OR (charged >= 0 AND charged <= hold_amount)", name="charged_within_hold"
        ),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_address: Mapped[str] = mapped_column(String(ADDRESS_LEN), index=True)
    model_id: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), server_default=HoldStatus.HELD.value)
    hold_amount: Mapped[int] = mapped_column(Amount)  # the most the job can cost, reserved at submit
    price: Mapped[int] = mapped_column(Amount)  # per token-layer, fixed when the job was accepted
    charged: Mapped[int | None] = mapped_column(Amount)  # what the user paid, set at settlement
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobUsage(Base):
    """Token-layers each worker ran for a job and what it was credited (written at settlement)."""

    __tablename__ = "job_usage"
    __table_args__ = (
        CheckConstraint("token_layers >= 0", name="token_layers_not_negative"),
        CheckConstraint("credited >= 0", name="credited_not_negative"),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"), primary_key=True)
    token_layers: Mapped[int] = mapped_column(BigInteger)
    credited: Mapped[int] = mapped_column(Amount)


class VerdictOutcome(enum.StrEnum):
    # A stage's numbers did not match the re-computation: its pay withheld, the user refunded.
    FAILED = "failed"


class Verdict(Base):
    """The verifier's finding against one worker for one job, with its evidence and what it moved.

    One per (job, worker): recording it twice changes nothing. ``withheld`` is what was taken back from the
    worker's account into its withheld account (``credited - shortfall``: a worker already paid out keeps
    the ``shortfall``); ``refunded`` is what this verdict gave back to the job's user (0 when another
    verdict of the same job already refunded it).
    """

    __tablename__ = "verdicts"
    __table_args__ = (
        UniqueConstraint("job_id", "worker_id", name="uq_verdicts_job_id_worker_id"),
        CheckConstraint(_in("outcome", [o.value for o in VerdictOutcome]), name="outcome_known"),
        CheckConstraint("credited >= 0 AND withheld >= 0 AND shortfall >= 0 AND refunded >= 0",
                        name="amounts_not_negative"),
        CheckConstraint("withheld + shortfall = credited", name="withheld_plus_shortfall_is_credit"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSONB)  # the verifier's: hop, chunk, max difference...
    credited: Mapped[int] = mapped_column(Amount)  # what settlement credited the worker for the job
    withheld: Mapped[int] = mapped_column(Amount)
    shortfall: Mapped[int] = mapped_column(Amount)
    refunded: Mapped[int] = mapped_column(Amount)
    withhold_transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"))
    refund_transaction_id: Mapped[int | None] = mapped_column(ForeignKey("journal_transactions.id"))
    created_at: Mapped[datetime] = _now()


class Payout(Base):
    __tablename__ = "payouts"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(_in("status", [s.value for s in PayoutStatus]), name="status_known"),
        # A payout is only broadcast after its signed tx id is recorded.
        CheckConstraint(
            "status IN ('pending', 'reversed', 'failed') OR tx_id IS NOT NULL", name="sent_has_tx"
        ),
        # At most one payout in flight per worker: a second one could never race the first into paying twice.
        Index(
            "uq_payouts_one_open_per_worker",
            "worker_id",
            unique=True,
            postgresql_where=text("status IN ('pending', 'sent')"),
        ),
        # A nonce belongs to one live payout (a reversed payout's nonce was never used on chain).
        Index(
            "uq_payouts_live_nonce",
            "nonce",
            unique=True,
            postgresql_where=text("nonce IS NOT NULL AND status <> 'reversed'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"), index=True)
    amount: Mapped[int] = mapped_column(Amount)
    to_address: Mapped[str] = mapped_column(String(ADDRESS_LEN))
    status: Mapped[str] = mapped_column(String(16), server_default=PayoutStatus.PENDING.value)
    tx_id: Mapped[str | None] = mapped_column(String(TX_ID_LEN), unique=True)
    nonce: Mapped[int | None] = mapped_column(BigInteger)
    # The exact signed bytes, kept so a resend after a restart sends the same transaction, never a new one.
    # Not a secret: broadcasting them can only make this very payment.
    raw_tx: Mapped[bytes | None] = mapped_column(LargeBinary)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("char_length(key_hash) = 64", name="key_hash_is_sha256_hex"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    address: Mapped[str] = mapped_column(String(ADDRESS_LEN), index=True)
    key_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 hex of the key; the key is never stored
    label: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuthChallenge(Base):
    __tablename__ = "auth_challenges"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    address: Mapped[str] = mapped_column(String(ADDRESS_LEN), index=True)
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    message: Mapped[str] = mapped_column(Text)  # the exact text the wallet signs
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # single use
