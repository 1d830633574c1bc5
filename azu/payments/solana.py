"""Solana: native SOL in lamports (9 decimals). The fallback chain.

Requests and answers are solders' typed JSON-RPC bodies; the transport is a plain blocking HTTP POST
(solana-py 0.41 only ships an asyncio client, and payouts run in a synchronous Celery task).
Transactions are built and signed with solders, so their signature (the tx id) is known before sending.
"""

from __future__ import annotations

import base64
import json
from typing import Any, TypeVar

import requests
from solders.commitment_config import CommitmentLevel
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.rpc.config import (
    RpcContextConfig,
    RpcSendTransactionConfig,
    RpcSignatureStatusConfig,
    RpcTransactionConfig,
)
from solders.rpc.requests import (
    GetLatestBlockhash,
    GetSignatureStatuses,
    GetTransaction,
    IsBlockhashValid,
    SendRawTransaction,
)
from solders.rpc.responses import (
    GetLatestBlockhashResp,
    GetSignatureStatusesResp,
    GetTransactionResp,
    IsBlockhashValidResp,
    SendTransactionResp,
)
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.system_program import TransferParams, decode_transfer, transfer
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_status import TransactionConfirmationStatus, UiTransactionEncoding

from azu.config import get_settings
from azu.errors import InvalidRequest, NotFound
from azu.payments.base import ChainError, DepositInfo, PaymentProvider, PayoutState, SignedPayout
from azu.payments.factory import register

R = TypeVar("R")
# getSignatureStatuses answers confirmations=null once a slot is rooted (finalized by the cluster):
# count that as the deepest lockout, 32 blocks.
FINALIZED_CONFIRMATIONS = 32


class RpcError(ChainError):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, message: str, *, rpc_code: int | None, rpc_data: Any = None) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.rpc_data = rpc_data


def parse_keypair(raw: str) -> Keypair:
    """``SOLANA_PRIVATE_KEY``: base58 of the 64-byte keypair (Phantom/solana-keygen export) or a JSON
    array of 64 bytes (the keygen file's content; 32 bytes = the seed). Errors never echo the key."""
    text = raw.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
            if not (isinstance(values, list) and all(isinstance(v, int) and 0 <= v <= 255 for v in values)):
                raise ValueError("a JSON keypair must be an array of integers 0..255")
            if len(values) == 64:
                return Keypair.from_bytes(bytes(values))
            if len(values) == 32:
                return Keypair.from_seed(bytes(values))
            raise ValueError("a JSON keypair must hold 64 bytes (or a 32-byte seed)")
        return Keypair.from_base58_string(text)
    except Exception as exc:
        reason = exc.args[0] if isinstance(exc, ValueError) and exc.args else "not a valid ed25519 keypair"
        raise ValueError(f"SOLANA_PRIVATE_KEY is malformed: {reason}") from None


def _decode_signature(text: str) -> Signature:
    """Wallets hand signatures out as base58 (the Solana convention), base64 or hex; all are 64 bytes."""
    text = text.strip()
    try:
        return Signature.from_string(text)
    except Exception:
        pass
    for decode in (lambda s: bytes.fromhex(s.removeprefix("0x")), base64.b64decode):
        try:
            raw = decode(text)
        except Exception:
            continue
        if len(raw) == 64:
            return Signature.from_bytes(raw)
    raise ValueError("not a 64-byte ed25519 signature in base58, base64 or hex")


@register("solana")
class SolanaProvider(PaymentProvider):
    unit = "SOL"
    decimals = 9

    def __init__(
        self,
        *,
        rpc_url: str | None = None,
        platform_address: str | None = None,
        private_key: str | None = None,
        min_confirmations: int | None = None,
        rpc_timeout_s: float = 10.0,
        http: requests.Session | None = None,
    ) -> None:
        settings = get_settings().payments  # constructor arguments win over the settings
        url = rpc_url or settings.solana_rpc_url
        if not url:
            raise ValueError("SOLANA_RPC_URL is not set")
        self._rpc_url = url
        self._timeout = rpc_timeout_s
        self._http = http or requests.Session()
        key = private_key if private_key is not None else settings.solana_private_key
        self._keypair: Keypair | None = parse_keypair(key) if key else None
        platform = platform_address or settings.solana_address
        if platform is None and self._keypair is not None:
            platform = str(self._keypair.pubkey())
        if platform is None:
            raise ValueError("SOLANA_ADDRESS is not set (the platform address that receives deposits)")
        self.platform_address = self.validate_address(platform)
        if min_confirmations is None:
            min_confirmations = 1 if settings.min_confirmations is None else settings.min_confirmations
        self.min_confirmations = min_confirmations
        if self.min_confirmations < 1:
            raise ValueError("MIN_CONFIRMATIONS must be at least 1")

    # -- transport --------------------------------------------------------------------------------
    def _call(self, body: Any, parser: type[R]) -> R:
        method = type(body).__name__
        try:
            answer = self._http.post(self._rpc_url, data=body.to_json(), timeout=self._timeout,
                                     headers={"Content-Type": "application/json"})
        except requests.RequestException as exc:
            # The URL is left out on purpose: hosted RPC URLs often carry an API key.
            raise ChainError(f"Solana RPC {method} failed: {type(exc).__name__}") from exc
        if answer.status_code != 200:
            raise ChainError(f"Solana RPC {method} answered HTTP {answer.status_code}")
        try:
            doc = answer.json()
        except ValueError:
            raise ChainError(f"Solana RPC {method} answered something that is not JSON") from None
        # Checked by hand first: solders' parser aborts on some error shapes (e.g. no "data" field).
        if isinstance(doc, dict) and doc.get("error") is not None:
            raw_err = doc["error"]
            err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {"message": str(raw_err)}
            code = err.get("code")
            raise RpcError(f"Solana RPC {method}: {code} {str(err.get('message'))[:300]}",
                           rpc_code=code if isinstance(code, int) else None, rpc_data=err.get("data"))
        try:
            return parser.from_json(answer.text)  # type: ignore[attr-defined,no-any-return]
        except Exception as exc:
            raise ChainError(f"Solana RPC {method} answered an unexpected shape: {exc}") from None

    def _signature(self, tx_id: str) -> Signature:
        try:
            return Signature.from_string(tx_id.strip())
        except Exception:
            raise InvalidRequest("a Solana transaction signature is 64 bytes in base58",
                                 param="tx_sig") from None

    def _signer(self) -> Keypair:
        if self._keypair is None:
            raise ChainError("SOLANA_PRIVATE_KEY is not set: this provider cannot sign payouts")
        return self._keypair

    @property
    def payout_address(self) -> str:
        return str(self._signer().pubkey())

    # -- addresses and deposits -------------------------------------------------------------------
    def validate_address(self, address: str) -> str:
        try:
            return str(Pubkey.from_string(address.strip()))
        except Exception:
            raise InvalidRequest(f"{address!r} is not a Solana address (base58 of a 32-byte public key)",
                                 param="address") from None

    def _status(self, sig: Signature) -> Any:
        config = RpcSignatureStatusConfig(search_transaction_history=True)
        resp = self._call(GetSignatureStatuses([sig], config), GetSignatureStatusesResp)
        return resp.value[0]

    @staticmethod
    def _status_confirmations(status: Any) -> int:
        level = status.confirmation_status
        if level == TransactionConfirmationStatus.Finalized or status.confirmations is None:
            return FINALIZED_CONFIRMATIONS
        count = int(status.confirmations)
        # "confirmed" means a supermajority voted on the block: at least one confirmation by our count.
        return max(count, 1) if level == TransactionConfirmationStatus.Confirmed else count

    def get_deposit(self, tx_id: str) -> DepositInfo:
        sig = self._signature(tx_id)
        config = RpcTransactionConfig(
            encoding=UiTransactionEncoding.Base64, commitment=CommitmentLevel.Confirmed,
            max_supported_transaction_version=0,
        )
        found = self._call(GetTransaction(sig, config), GetTransactionResp).value
        if found is None:
            raise NotFound(f"no confirmed transaction {sig} on the chain (yet)", param="tx_sig")
        tx = found.transaction.transaction
        meta = found.transaction.meta
        if not isinstance(tx, VersionedTransaction) or meta is None or tx.signatures[0] != sig:
            raise ChainError(f"Solana RPC answered an unusable transaction for {sig}")
        message = tx.message
        keys = list(message.account_keys)
        if meta.loaded_addresses is not None:  # v0 transactions: address-lookup-table accounts follow
            keys += [Pubkey.from_string(str(k)) for k in meta.loaded_addresses.writable]
            keys += [Pubkey.from_string(str(k)) for k in meta.loaded_addresses.readonly]
        transfers = []
        for ix in message.instructions:
            if keys[ix.program_id_index] != SYSTEM_PROGRAM_ID:
                continue
            metas = [AccountMeta(keys[i], is_signer=False, is_writable=True) for i in bytes(ix.accounts)]
            try:
                params = decode_transfer(Instruction(SYSTEM_PROGRAM_ID, bytes(ix.data), metas))
            except Exception:  # another system instruction (create account, allocate, ...)
                continue
            transfers.append((str(params["from_pubkey"]), str(params["to_pubkey"]), int(params["lamports"])))
        to_platform = [t for t in transfers if t[1] == self.platform_address]
        if to_platform:
            senders = {t[0] for t in to_platform}
            if len(senders) > 1:
                raise InvalidRequest(f"transaction {sig} pays the platform from several accounts; send one "
                                     "transfer per deposit", param="tx_sig")
            sender, recipient, amount = senders.pop(), self.platform_address, sum(t[2] for t in to_platform)
        elif transfers:
            sender, recipient, amount = transfers[0]
        else:
            sender, recipient, amount = str(keys[0]), "", 0
        status = self._status(sig)
        confirmations = self._status_confirmations(status) if status is not None else 1
        return DepositInfo(str(sig), sender, recipient, amount, succeeded=meta.err is None,
                           confirmations=confirmations)

    # -- payouts ----------------------------------------------------------------------------------
    def next_nonce(self) -> None:
        return None  # Solana orders nothing by nonce: a recent blockhash bounds each transaction's life

    def sign_payout(self, *, to: str, amount: int, nonce: int | None) -> SignedPayout:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidRequest(f"payout amount must be a positive integer of lamports, got {amount!r}")
        keypair = self._signer()
        dest = Pubkey.from_string(self.validate_address(to))
        # A finalized blockhash: every node knows it, so "is it still valid" has one answer everywhere.
        latest = self._call(GetLatestBlockhash(RpcContextConfig(commitment=CommitmentLevel.Finalized)),
                            GetLatestBlockhashResp).value
        ix = transfer(TransferParams(from_pubkey=keypair.pubkey(), to_pubkey=dest, lamports=amount))
        message = Message.new_with_blockhash([ix], keypair.pubkey(), latest.blockhash)
        tx = Transaction([keypair], message, latest.blockhash)
        return SignedPayout(tx_id=str(tx.signatures[0]), raw=bytes(tx), nonce=None)

    def broadcast(self, payout: SignedPayout) -> None:
        config = RpcSendTransactionConfig(skip_preflight=False,
                                          preflight_commitment=CommitmentLevel.Confirmed)
        try:
            sent = self._call(SendRawTransaction(payout.raw, config), SendTransactionResp)
        except RpcError as exc:
            data = exc.rpc_data if isinstance(exc.rpc_data, dict) else {}
            if data.get("err") == "AlreadyProcessed" or "already been processed" in str(exc):
                return
            if self.payout_state(payout.tx_id) is not PayoutState.NOT_FOUND:
                return
            raise
        if str(sent.value) != payout.tx_id:
            raise ChainError(f"node answered signature {sent.value} for {payout.tx_id}")

    def payout_state(self, tx_id: str) -> PayoutState:
        status = self._status(self._signature(tx_id))
        if status is None:
            return PayoutState.NOT_FOUND
        if self._status_confirmations(status) < self.min_confirmations:
            return PayoutState.PENDING
        return PayoutState.CONFIRMED if status.err is None else PayoutState.FAILED

    def superseded(self, payout: SignedPayout) -> bool:
        blockhash = VersionedTransaction.from_bytes(payout.raw).message.recent_blockhash
        # Finalized: once the blockhash is too old even there, no future block can include the tx.
        finalized = RpcContextConfig(commitment=CommitmentLevel.Finalized)
        valid = self._call(IsBlockhashValid(blockhash, finalized), IsBlockhashValidResp).value
        if valid:
            return False
        return self.payout_state(payout.tx_id) is PayoutState.NOT_FOUND

    # -- wallet signatures ------------------------------------------------------------------------
    def verify_signature(self, *, address: str, message: str, signature: str) -> bool:
        """ed25519 over the UTF-8 message bytes (what wallets' ``signMessage`` signs)."""
        try:
            pubkey = Pubkey.from_string(address.strip())
            return bool(_decode_signature(signature).verify(pubkey, message.encode("utf-8")))
        except Exception:
            return False
