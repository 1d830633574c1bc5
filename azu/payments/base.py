"""What azu needs from a chain: verify a deposit, sign and send a payout, follow it, check wallet signatures.

Amounts are integers in the chain's base unit (wei, lamports). A payout is *signed* before it is sent so
its transaction id is known, and recorded, before any byte leaves the process: whatever happens after
that (a lost answer, a timeout, a crash), the next run can ask the chain about that exact id.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from azu.errors import AzuError, Conflict, InvalidRequest


class ChainError(AzuError):
    """The chain's RPC did not answer, or answered with an error (down, timeout, refused transaction).

    Nothing can be concluded from it about the transaction: callers retry or reconcile later.
    """

    status = 503
    code = "chain_unavailable"


@dataclass(frozen=True)
class DepositInfo:
    """What the chain says about a transaction (a transfer to the platform, usually)."""

    tx_id: str
    sender: str
    recipient: str
    amount: int  # base units (wei / lamports)
    succeeded: bool  # included and executed without error; False while pending or when it reverted
    confirmations: int  # 0 while not yet in a block


class PayoutState(StrEnum):
    PENDING = "pending"  # known to the chain (mempool, or in a block with too few confirmations)
    CONFIRMED = "confirmed"  # executed successfully with enough confirmations
    FAILED = "failed"  # included but reverted: the nonce/fee is spent, the value was not moved
    NOT_FOUND = "not_found"  # the chain has never seen it (or dropped it)


@dataclass(frozen=True)
class SignedPayout:
    """Signed before it is sent, so its tx id is known (and recorded) before broadcast."""

    tx_id: str
    raw: bytes  # the exact signed bytes: a resend sends these again, never a new transaction
    nonce: int | None  # None on Solana (recent-blockhash based)


class PaymentProvider(ABC):
    name: ClassVar[str]
    unit: ClassVar[str]  # display unit (HYPE, SOL); amounts are always in base units
    decimals: ClassVar[int]

    platform_address: str  # receives deposits
    min_confirmations: int

    # -- addresses and deposits -------------------------------------------------------------------
    @abstractmethod
    def validate_address(self, address: str) -> str:
        """The normalized address, or raise azu.errors.InvalidRequest."""

    @abstractmethod
    def get_deposit(self, tx_id: str) -> DepositInfo:
        """What the chain says about ``tx_id``; raise azu.errors.NotFound if it has no such transaction,
        InvalidRequest if ``tx_id`` is malformed, ChainError if the RPC fails."""

    def verify_deposit(self, tx_id: str, *, sender: str | None = None) -> DepositInfo:
        """``get_deposit`` plus every check a credit needs; raise a 4xx error with the reason otherwise.

        Checks: it succeeded, it was sent to the platform address, it moved a positive amount, it has
        at least ``min_confirmations``, and (when ``sender`` is given) that address really sent it.
        """
        info = self.get_deposit(tx_id)
        if info.confirmations == 0 and not info.succeeded:
            raise Conflict(f"transaction {info.tx_id} is not in a block yet; retry once it is confirmed",
                           param="tx_sig")
        if not info.succeeded:
            raise InvalidRequest(f"transaction {info.tx_id} failed on chain", param="tx_sig")
        if info.recipient != self.platform_address:
            raise InvalidRequest(f"transaction {info.tx_id} was not sent to the platform address "
                                 f"{self.platform_address}", param="tx_sig")
        if info.amount <= 0:
            raise InvalidRequest(f"transaction {info.tx_id} moved no funds to the platform", param="tx_sig")
        if info.confirmations < self.min_confirmations:
            raise Conflict(f"transaction {info.tx_id} has {info.confirmations} confirmation(s), "
                           f"{self.min_confirmations} needed; retry later", param="tx_sig")
        if sender is not None and self.validate_address(sender) != info.sender:
            raise InvalidRequest(f"transaction {info.tx_id} was not sent by {sender}", param="user_pubkey")
        return info

    # -- payouts ----------------------------------------------------------------------------------
    @abstractmethod
    def next_nonce(self) -> int | None:
        """Next unused nonce of the payout account as the chain sees it (pending included); None if the
        chain has no nonces."""

    @abstractmethod
    def sign_payout(self, *, to: str, amount: int, nonce: int | None) -> SignedPayout:
        """Build and sign (but do not send) a transfer of ``amount`` base units to ``to``."""

    @abstractmethod
    def broadcast(self, payout: SignedPayout) -> None:
        """Send the signed bytes. Re-sending an already-known transaction is not an error.

        Raise ChainError when the node refuses it or cannot be reached: the caller must then assume
        nothing about whether it went out (reconcile by tx id).
        """

    @abstractmethod
    def payout_state(self, tx_id: str) -> PayoutState:
        """Where the chain stands on a payout sent (or maybe sent) earlier."""

    @abstractmethod
    def superseded(self, payout: SignedPayout) -> bool:
        """True only when ``payout`` can provably never land: its nonce was consumed by another
        transaction (EVM) or its blockhash expired (Solana), and it is not on chain. Only then may
        the payout be failed and its amount given back without risking a second payment."""

    def blocking_gap(self, payout: SignedPayout, *, held_nonces: set[int]) -> list[int]:
        """Nonces below ``payout.nonce`` that no transaction occupies and none of ours holds
        (``held_nonces``): while they stay empty, ``payout`` can never be mined. Empty on chains
        without nonces."""
        return []

    def sign_filler(self, *, nonce: int) -> SignedPayout:
        """A transaction that moves nothing (a zero-value self-transfer) and only consumes ``nonce``:
        fills a gap so the payouts signed above it can be mined."""
        raise NotImplementedError(f"{self.name} has no nonces")

    # -- wallet signatures ------------------------------------------------------------------------
    @abstractmethod
    def verify_signature(self, *, address: str, message: str, signature: str) -> bool:
        """True when ``signature`` over ``message`` was made by ``address``'s key (EIP-191 / ed25519).
        Malformed input answers False, never raises."""

    def to_display(self, amount: int) -> str:
        """Base units as a decimal string in the display unit (for humans, never for arithmetic)."""
        whole, frac = divmod(amount, 10**self.decimals)
        frac_s = f"{frac:0{self.decimals}d}".rstrip("0")
        return f"{whole}.{frac_s} {self.unit}" if frac_s else f"{whole} {self.unit}"
