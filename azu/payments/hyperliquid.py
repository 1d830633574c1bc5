"""Hyperliquid's HyperEVM: native HYPE (18 decimals) over Ethereum JSON-RPC, through web3.

The same code talks to a real node (``HYPERLIQUID_RPC_URL``) and, in tests, to an in-process py-evm chain:
pass ``web3=Web3(EthereumTesterProvider())``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn
from urllib.parse import urlsplit

import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import is_checksum_address, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound

from azu.config import get_settings
from azu.errors import AzuError, InvalidRequest, NotFound
from azu.payments.base import ChainError, DepositInfo, PaymentProvider, PayoutState, SignedPayout
from azu.payments.factory import register

_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_PLAIN_TRANSFER_GAS = 21_000
# Node answers meaning "I already have this exact transaction" (geth, reth, erigon, nethermind wording).
_ALREADY_KNOWN = ("already known", "known transaction", "alreadyknown", "already imported")


def parse_private_key(raw: str) -> LocalAccount:
    """``SCHEDULER_PRIVATE_KEY``: hex (with or without 0x) or a JSON array of 32 bytes.

    The error messages never echo the key.
    """
    text = raw.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
            if not (isinstance(values, list) and len(values) == 32
                    and all(isinstance(v, int) and 0 <= v <= 255 for v in values)):
                raise ValueError("a JSON private key must be an array of 32 integers 0..255")
            key = bytes(values)
        else:
            hex_part = text[2:] if text.lower().startswith("0x") else text
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hex_part):
                raise ValueError("a hex private key must be 64 hex digits (optionally 0x-prefixed)")
            key = bytes.fromhex(hex_part)
        return Account.from_key(key)
    except ValueError as exc:
        reason = exc.args[0] if exc.args else "invalid"
        raise ValueError(f"SCHEDULER_PRIVATE_KEY is malformed: {reason}") from None


@register("hyperliquid")
class HyperliquidProvider(PaymentProvider):
    unit = "HYPE"
    decimals = 18

    def __init__(
        self,
        *,
        web3: Web3 | None = None,
        rpc_url: str | None = None,
        platform_address: str | None = None,
        private_key: str | None = None,
        chain_id: int | None = None,
        min_confirmations: int | None = None,
        rpc_timeout_s: float = 10.0,
    ) -> None:
        settings = get_settings().payments  # constructor arguments win over the settings
        self._rpc_url = rpc_url or settings.hyperliquid_rpc_url
        if web3 is None:
            if not self._rpc_url:
                raise ValueError("HYPERLIQUID_RPC_URL is not set")
            web3 = Web3(Web3.HTTPProvider(self._rpc_url, request_kwargs={"timeout": rpc_timeout_s}))
        self.w3 = web3
        key = private_key if private_key is not None else settings.scheduler_private_key
        self._account: LocalAccount | None = parse_private_key(key) if key else None
        platform = platform_address or settings.hyperliquid_address
        if platform is None and self._account is not None:
            platform = self._account.address
        if platform is None:
            raise ValueError("HYPERLIQUID_ADDRESS is not set (the platform address that receives deposits)")
        self.platform_address = self.validate_address(platform)
        self._chain_id = chain_id if chain_id is not None else settings.hyperliquid_chain_id
        if min_confirmations is None:
            min_confirmations = 1 if settings.min_confirmations is None else settings.min_confirmations
        self.min_confirmations = min_confirmations
        if self.min_confirmations < 1:
            raise ValueError("MIN_CONFIRMATIONS must be at least 1")

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def payout_address(self) -> ChecksumAddress:
        """The account payouts are sent from (the scheduler key's address)."""
        return self._signer().address

    def _signer(self) -> LocalAccount:
        if self._account is None:
            raise ChainError("SCHEDULER_PRIVATE_KEY is not set: this provider cannot sign payouts")
        return self._account

    @contextmanager
    def _rpc(self, what: str) -> Iterator[None]:
        """Any failure of the node or the transport becomes a ChainError (a 503), with the RPC URL
        scrubbed from the message since hosted RPC URLs often carry an API key."""
        try:
            yield
        except (AzuError, TransactionNotFound):
            raise
        except Exception as exc:
            self._raise_chain_error(what, exc)

    def _raise_chain_error(self, what: str, exc: Exception) -> NoReturn:
        if isinstance(exc, requests.RequestException):
            # Transport messages quote the URL, host and path piecemeal; hosted RPC URLs often carry an
            # API key in any of them. The exception type says enough (refused, timeout, ...).
            raise ChainError(f"{what} failed: {type(exc).__name__} talking to the RPC node") from exc
        detail = str(exc)
        if self._rpc_url:
            parts = urlsplit(self._rpc_url)
            for secret in (self._rpc_url, parts.netloc, parts.path, parts.query):
                if len(secret) > 1:
                    detail = detail.replace(secret, "<rpc>")
        raise ChainError(f"{what} failed: {type(exc).__name__}: {detail[:300]}") from exc

    def _tx_hash(self, tx_id: str) -> str:
        if not isinstance(tx_id, str) or not _TX_HASH.match(tx_id.strip()):
            raise InvalidRequest("a HyperEVM transaction hash is 0x followed by 64 hex digits",
                                 param="tx_sig")
        return tx_id.strip().lower()

    def chain_id(self) -> int:
        if self._chain_id is None:
            with self._rpc("eth_chainId"):
                self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def _confirmations(self, block_number: int | None) -> int:
        if block_number is None:
            return 0
        with self._rpc("eth_blockNumber"):
            latest = int(self.w3.eth.block_number)
        return max(0, latest - int(block_number) + 1)

    # -- addresses and deposits -------------------------------------------------------------------
    def validate_address(self, address: str) -> str:
        text = address.strip() if isinstance(address, str) else ""
        if not _ADDRESS.match(text):
            raise InvalidRequest(f"{address!r} is not an EVM address (0x + 40 hex digits)", param="address")
        body = text[2:]
        # Mixed case is an EIP-55 checksum and must be right (a typo there would send money nowhere).
        if body != body.lower() and body != body.upper() and not is_checksum_address(text):
            raise InvalidRequest(f"{address!r} has a wrong EIP-55 checksum", param="address")
        return to_checksum_address(text)

    def get_deposit(self, tx_id: str) -> DepositInfo:
        tx_hash = self._tx_hash(tx_id)
        try:
            with self._rpc("eth_getTransactionByHash"):
                tx = self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            raise NotFound(f"no transaction {tx_hash} on the chain", param="tx_sig") from None
        recipient = to_checksum_address(tx["to"]) if tx.get("to") else ""
        sender = to_checksum_address(tx["from"])
        amount = int(tx["value"])
        if tx.get("blockNumber") is None:  # still in the mempool
            return DepositInfo(tx_hash, sender, recipient, amount, succeeded=False, confirmations=0)
        try:
            with self._rpc("eth_getTransactionReceipt"):
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return DepositInfo(tx_hash, sender, recipient, amount, succeeded=False, confirmations=0)
        return DepositInfo(tx_hash, sender, recipient, amount, succeeded=int(receipt["status"]) == 1,
                           confirmations=self._confirmations(receipt["blockNumber"]))

    # -- payouts ----------------------------------------------------------------------------------
    def next_nonce(self) -> int:
        with self._rpc("eth_getTransactionCount"):
            return int(self.w3.eth.get_transaction_count(self.payout_address, "pending"))

    def _mined_nonce(self) -> int:
        with self._rpc("eth_getTransactionCount"):
            return int(self.w3.eth.get_transaction_count(self.payout_address, "latest"))

    def _fees(self) -> dict[str, Any]:
        with self._rpc("fee estimation"):
            base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas")
            if base_fee is None:  # pre-London chain: legacy pricing
                return {"gasPrice": int(self.w3.eth.gas_price)}
            try:
                tip = int(self.w3.eth.max_priority_fee)
            except Exception:  # eth_maxPriorityFeePerGas is optional on some nodes
                tip = max(0, int(self.w3.eth.gas_price) - int(base_fee))
        # 2x the base fee: the transaction stays includable through several full blocks, and since a
        # resend must send these exact bytes, it cannot be repriced later.
        return {"type": 2, "maxFeePerGas": 2 * int(base_fee) + tip, "maxPriorityFeePerGas": tip}

    def _sign(self, *, to: str, amount: int, nonce: int) -> SignedPayout:
        account = self._signer()
        with self._rpc("eth_getCode"):
            has_code = len(self.w3.eth.get_code(to)) > 0  # type: ignore[arg-type]
        gas = _PLAIN_TRANSFER_GAS
        if has_code:  # a contract wallet may need more than a plain transfer's gas
            try:
                gas = int(self.w3.eth.estimate_gas({"from": account.address, "to": to, "value": amount}))  # type: ignore[typeddict-item]
            except Exception as exc:
                if isinstance(exc, ContractLogicError) or "revert" in str(exc).lower():
                    # The recipient contract refuses the transfer: it would fail on chain every time.
                    raise InvalidRequest(f"{to} is a contract that refuses the transfer") from None
                self._raise_chain_error("eth_estimateGas", exc)
        tx = {"to": to, "value": amount, "nonce": nonce, "gas": gas, "chainId": self.chain_id(),
              **self._fees()}
        signed = account.sign_transaction(tx)
        return SignedPayout(tx_id=signed.hash.to_0x_hex(), raw=bytes(signed.raw_transaction), nonce=nonce)

    def sign_payout(self, *, to: str, amount: int, nonce: int | None) -> SignedPayout:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidRequest(f"payout amount must be a positive integer of wei, got {amount!r}")
        if nonce is None or nonce < 0:
            raise InvalidRequest("an EVM payout needs a nonce")
        return self._sign(to=self.validate_address(to), amount=amount, nonce=nonce)

    def sign_filler(self, *, nonce: int) -> SignedPayout:
        return self._sign(to=self.payout_address, amount=0, nonce=nonce)

    def broadcast(self, payout: SignedPayout) -> None:
        try:
            sent = self.w3.eth.send_raw_transaction(payout.raw)
        except Exception as exc:
            if any(marker in str(exc).lower() for marker in _ALREADY_KNOWN):
                return
            # Maybe it did go out (an earlier send whose answer was lost, now mined): then it is fine.
            if self.payout_state(payout.tx_id) is not PayoutState.NOT_FOUND:
                return
            self._raise_chain_error("eth_sendRawTransaction", exc)
        if sent.to_0x_hex().lower() != payout.tx_id.lower():
            raise ChainError(f"node answered tx hash {sent.to_0x_hex()} for {payout.tx_id}")

    def payout_state(self, tx_id: str) -> PayoutState:
        tx_hash = self._tx_hash(tx_id)
        try:
            with self._rpc("eth_getTransactionReceipt"):
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            try:
                with self._rpc("eth_getTransactionByHash"):
                    self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return PayoutState.NOT_FOUND
            return PayoutState.PENDING
        if self._confirmations(receipt["blockNumber"]) < self.min_confirmations:
            return PayoutState.PENDING
        return PayoutState.CONFIRMED if int(receipt["status"]) == 1 else PayoutState.FAILED

    def superseded(self, payout: SignedPayout) -> bool:
        if payout.nonce is None:
            return False
        # Nonce first, then the tx: once the account's mined nonce has passed ours, whether our tx is
        # among the mined ones is settled, so "passed and not found" means another tx took the nonce.
        if self._mined_nonce() <= payout.nonce:
            return False
        return self.payout_state(payout.tx_id) is PayoutState.NOT_FOUND

    def blocking_gap(self, payout: SignedPayout, *, held_nonces: set[int]) -> list[int]:
        if payout.nonce is None:
            return []
        start = self.next_nonce()  # first nonce not taken by a mined or pending tx of this account
        return [n for n in range(start, payout.nonce) if n not in held_nonces]

    # -- wallet signatures ------------------------------------------------------------------------
    def verify_signature(self, *, address: str, message: str, signature: str) -> bool:
        """EIP-191 ``personal_sign`` over the UTF-8 message."""
        try:
            expected = self.validate_address(address)
            recovered = Account.recover_message(encode_defunct(text=message), signature=signature)
        except Exception:  # malformed signature/address: not a valid proof, not a server error
            return False
        return bool(recovered == expected)
