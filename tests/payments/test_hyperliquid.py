"""HyperliquidProvider against a real EVM (py-evm through web3's EthereumTesterProvider), same code path
as against a HyperEVM node."""

from __future__ import annotations

import json

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from web3 import Web3

from azu.errors import Conflict, InvalidRequest, NotFound
from azu.payments.base import ChainError, PayoutState
from azu.payments.hyperliquid import HyperliquidProvider, parse_private_key
from tests.support.chain import deploy_reverting_contract

pytestmark = pytest.mark.chain


def _deposit(w3: Web3, to: str, value: int, *, sender_index: int = 1, gas: int | None = None) -> str:
    tx: dict = {"from": w3.eth.accounts[sender_index], "to": to, "value": value}
    if gas:
        tx["gas"] = gas
    return w3.eth.send_transaction(tx).to_0x_hex()  # type: ignore[arg-type]


# -- addresses and keys ---------------------------------------------------------------------------------


def test_validate_address_normalizes_to_checksum(hl: HyperliquidProvider) -> None:
    address = Account.create().address
    assert hl.validate_address(address.lower()) == address
    assert hl.validate_address(f"  {address} ") == address


@pytest.mark.parametrize("bad", ["", "0x123", "not an address", "0x" + "g" * 40])
def test_validate_address_refuses_garbage(hl: HyperliquidProvider, bad: str) -> None:
    with pytest.raises(InvalidRequest):
        hl.validate_address(bad)


def test_validate_address_refuses_a_broken_checksum(hl: HyperliquidProvider) -> None:
    address = Account.create().address
    letters = [i for i, c in enumerate(address) if i > 1 and c.isalpha()]
    flipped = list(address)
    flipped[letters[0]] = flipped[letters[0]].swapcase()  # mixed case with one wrong letter
    with pytest.raises(InvalidRequest):
        hl.validate_address("".join(flipped))


def test_private_key_accepts_hex_and_json_bytes() -> None:
    account = Account.create()
    key = bytes(account.key)
    for text in (key.hex(), "0x" + key.hex(), json.dumps(list(key))):
        assert parse_private_key(text).address == account.address


@pytest.mark.parametrize("bad", ["0x1234", "[1, 2, 3]", "zz" * 32, "[" + ",".join(["300"] * 32) + "]"])
def test_private_key_errors_never_echo_the_key(bad: str) -> None:
    with pytest.raises(ValueError, match="SCHEDULER_PRIVATE_KEY is malformed") as info:
        parse_private_key(bad)
    assert bad not in str(info.value)


# -- deposits -------------------------------------------------------------------------------------------


def test_deposit_to_platform_is_verified_with_its_real_sender(w3: Web3, hl: HyperliquidProvider) -> None:
    tx = _deposit(w3, hl.platform_address, 5 * 10**17)
    info = hl.verify_deposit(tx, sender=w3.eth.accounts[1].lower())
    assert (info.sender, info.recipient, info.amount) == (w3.eth.accounts[1], hl.platform_address, 5 * 10**17)
    assert info.succeeded and info.confirmations == 1
    with pytest.raises(InvalidRequest, match="was not sent by"):
        hl.verify_deposit(tx, sender=w3.eth.accounts[2])


def test_deposit_sent_elsewhere_is_refused(w3: Web3, hl: HyperliquidProvider) -> None:
    tx = _deposit(w3, Account.create().address, 10**17)
    with pytest.raises(InvalidRequest, match="not sent to the platform"):
        hl.verify_deposit(tx)


def test_deposit_without_value_is_refused(w3: Web3, hl: HyperliquidProvider) -> None:
    with pytest.raises(InvalidRequest, match="moved no funds"):
        hl.verify_deposit(_deposit(w3, hl.platform_address, 0))


def test_deposit_needs_enough_confirmations(w3: Web3, scheduler: LocalAccount) -> None:
    strict = HyperliquidProvider(web3=w3, private_key=scheduler.key.to_0x_hex(), min_confirmations=3)
    tx = _deposit(w3, strict.platform_address, 10**17)
    with pytest.raises(Conflict, match="1 confirmation"):
        strict.verify_deposit(tx)
    w3.provider.ethereum_tester.mine_blocks(2)  # type: ignore[attr-defined]
    assert strict.verify_deposit(tx).confirmations == 3


def test_reverted_deposit_is_refused(w3: Web3, scheduler: LocalAccount) -> None:
    contract = deploy_reverting_contract(w3)
    provider = HyperliquidProvider(web3=w3, private_key=scheduler.key.to_0x_hex(), platform_address=contract)
    tx = _deposit(w3, contract, 10**17, gas=100_000)
    info = provider.get_deposit(tx)
    assert not info.succeeded and info.confirmations == 1
    with pytest.raises(InvalidRequest, match="failed on chain"):
        provider.verify_deposit(tx)


def test_unknown_and_malformed_transactions(hl: HyperliquidProvider) -> None:
    with pytest.raises(NotFound):
        hl.get_deposit("0x" + "ab" * 32)
    with pytest.raises(InvalidRequest, match="64 hex"):
        hl.get_deposit("0x1234")


# -- payouts --------------------------------------------------------------------------------------------


def test_payout_is_signed_before_it_is_sent_and_lands_once(w3: Web3, hl: HyperliquidProvider) -> None:
    worker = Account.create().address
    nonce = hl.next_nonce()
    signed = hl.sign_payout(to=worker, amount=12345, nonce=nonce)
    assert hl.payout_state(signed.tx_id) is PayoutState.NOT_FOUND  # the id is known before any broadcast
    hl.broadcast(signed)
    assert hl.payout_state(signed.tx_id) is PayoutState.CONFIRMED
    assert w3.eth.get_transaction(signed.tx_id)["nonce"] == nonce  # type: ignore[arg-type]
    hl.broadcast(signed)  # the same bytes again: not an error, and no second transfer
    assert w3.eth.get_balance(worker) == 12345
    assert hl.next_nonce() == nonce + 1


def test_payout_needs_min_confirmations(w3: Web3, scheduler: LocalAccount) -> None:
    strict = HyperliquidProvider(web3=w3, private_key=scheduler.key.to_0x_hex(), min_confirmations=2)
    signed = strict.sign_payout(to=Account.create().address, amount=1, nonce=strict.next_nonce())
    strict.broadcast(signed)
    assert strict.payout_state(signed.tx_id) is PayoutState.PENDING
    w3.provider.ethereum_tester.mine_blocks(1)  # type: ignore[attr-defined]
    assert strict.payout_state(signed.tx_id) is PayoutState.CONFIRMED


def test_payout_refused_before_signing(w3: Web3, hl: HyperliquidProvider) -> None:
    with pytest.raises(InvalidRequest):
        hl.sign_payout(to=Account.create().address, amount=0, nonce=0)
    with pytest.raises(InvalidRequest):
        hl.sign_payout(to="0xnope", amount=1, nonce=0)
    with pytest.raises(InvalidRequest, match="refuses"):
        hl.sign_payout(to=deploy_reverting_contract(w3), amount=1, nonce=hl.next_nonce())


def test_superseded_only_when_another_tx_took_the_nonce(w3: Web3, hl: HyperliquidProvider) -> None:
    nonce = hl.next_nonce()
    payout = hl.sign_payout(to=Account.create().address, amount=10, nonce=nonce)
    assert not hl.superseded(payout)  # the nonce is still free: it could land
    hl.broadcast(hl.sign_filler(nonce=nonce))  # another transaction takes the nonce
    assert hl.superseded(payout)
    with pytest.raises(ChainError):
        hl.broadcast(payout)  # refused by the node, and not on chain: an error, not silence
    assert hl.payout_state(payout.tx_id) is PayoutState.NOT_FOUND

    landed = hl.sign_payout(to=Account.create().address, amount=10, nonce=hl.next_nonce())
    hl.broadcast(landed)
    assert not hl.superseded(landed)  # its own nonce passed, but it is on chain


def test_blocking_gap_lists_empty_nonces_below(hl: HyperliquidProvider) -> None:
    base = hl.next_nonce()
    payout = hl.sign_payout(to=Account.create().address, amount=10, nonce=base + 3)
    assert hl.blocking_gap(payout, held_nonces=set()) == [base, base + 1, base + 2]
    assert hl.blocking_gap(payout, held_nonces={base + 1}) == [base, base + 2]
    for nonce in hl.blocking_gap(payout, held_nonces=set()):
        hl.broadcast(hl.sign_filler(nonce=nonce))
    hl.broadcast(payout)  # now minable
    assert hl.payout_state(payout.tx_id) is PayoutState.CONFIRMED


def test_rpc_down_is_a_chain_error_that_hides_the_url() -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    provider = HyperliquidProvider(rpc_url="http://127.0.0.1:9/secret-api-key", chain_id=1, rpc_timeout_s=2,
                                   platform_address=Account.create().address,
                                   private_key=Account.create().key.to_0x_hex())
    with pytest.raises(ChainError) as info:
        provider.get_deposit("0x" + "ab" * 32)
    assert "secret-api-key" not in str(info.value)
    with pytest.raises(ChainError):
        provider.next_nonce()


# -- signatures -----------------------------------------------------------------------------------------


def test_eip191_signature_recovery(hl: HyperliquidProvider) -> None:
    wallet = Account.create()
    message = "azu wants you to sign in\nNonce: 1234"
    signature = wallet.sign_message(encode_defunct(text=message)).signature.to_0x_hex()
    assert hl.verify_signature(address=wallet.address.lower(), message=message, signature=signature)
    assert not hl.verify_signature(address=Account.create().address, message=message, signature=signature)
    assert not hl.verify_signature(address=wallet.address, message=message + "!", signature=signature)
    assert not hl.verify_signature(address=wallet.address, message=message, signature="0xdeadbeef")
    assert not hl.verify_signature(address="garbage", message=message, signature=signature)


def test_to_display(hl: HyperliquidProvider) -> None:
    assert hl.to_display(10**15) == "0.001 HYPE"
    assert hl.to_display(2 * 10**18) == "2 HYPE"
