"""The dev chain of ``azu up``: py-evm served over real HTTP JSON-RPC on loopback, used by the unchanged
HyperliquidProvider through its URL (no in-process shortcut)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from eth_account import Account
from web3 import Web3

from azu.errors import InvalidRequest
from azu.payments.base import ChainError, PayoutState
from azu.payments.devchain import (
    ACCOUNT_BALANCE,
    DEFAULT_CHAIN_ID,
    PLATFORM_BALANCE,
    DevChain,
    core_env,
    start_devchain,
    worker_wallet,
)
from azu.payments.hyperliquid import HyperliquidProvider

pytestmark = pytest.mark.chain

# anvil's and Hardhat's account 0 of "test test ... junk": the dev chain hands out the same well-known one.
ANVIL_ACCOUNT_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


@pytest.fixture
def chain() -> Iterator[DevChain]:
    with start_devchain() as c:
        yield c


@pytest.fixture
def w3(chain: DevChain) -> Web3:
    return Web3(Web3.HTTPProvider(chain.url, request_kwargs={"timeout": 10}))


@pytest.fixture
def hl(chain: DevChain) -> HyperliquidProvider:
    # Exactly what the core processes build from chain.env(): the URL, the platform key, the chain id.
    env = chain.env()
    return HyperliquidProvider(rpc_url=env["HYPERLIQUID_RPC_URL"], private_key=env["SCHEDULER_PRIVATE_KEY"],
                               platform_address=env["HYPERLIQUID_ADDRESS"],
                               chain_id=int(env["HYPERLIQUID_CHAIN_ID"]),
                               min_confirmations=int(env["MIN_CONFIRMATIONS"]))


def _transfer(w3: Web3, private_key: str, to: str, value: int, *, chain_id: int = DEFAULT_CHAIN_ID) -> str:
    """What a user's wallet does: sign locally, send the raw bytes."""
    account = Account.from_key(private_key)
    base_fee = int(w3.eth.get_block("latest")["baseFeePerGas"])  # type: ignore[typeddict-item]
    signed = account.sign_transaction({
        "to": to, "value": value, "gas": 21_000, "nonce": w3.eth.get_transaction_count(account.address),
        "maxFeePerGas": 2 * base_fee + 10**9, "maxPriorityFeePerGas": 10**9, "chainId": chain_id, "type": 2})
    return w3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex()


def _rpc(url: str, payload: object, **headers: str) -> requests.Response:
    return requests.post(url, data=json.dumps(payload), timeout=10,
                         headers={"Content-Type": "application/json", **headers})


def test_funded_test_accounts_platform_and_chain_id(chain: DevChain, w3: Web3) -> None:
    assert chain.url.startswith("http://127.0.0.1:")
    assert w3.eth.chain_id == chain.chain_id == DEFAULT_CHAIN_ID
    assert chain.accounts[0].address == ANVIL_ACCOUNT_0
    assert Account.from_key(chain.accounts[0].private_key).address == ANVIL_ACCOUNT_0
    assert len(chain.accounts) == 10 and chain.platform.address not in {a.address for a in chain.accounts}
    assert all(w3.eth.get_balance(a.address) == ACCOUNT_BALANCE for a in chain.accounts)  # type: ignore[arg-type]
    assert w3.eth.get_balance(chain.platform.address) == PLATFORM_BALANCE  # type: ignore[arg-type]
    assert w3.eth.get_balance(worker_wallet(0).address) == 0  # type: ignore[arg-type]
    banner = chain.banner()
    assert "never use on a real chain" in banner
    assert chain.accounts[3].private_key in banner and chain.platform.address in banner
    info = chain.info(worker_ids=["local-0", "local-1"])
    assert info["rpc_url"] == chain.url and info["platform_address"] == chain.platform.address
    assert info["worker_wallets"] == {f"local-{i}": worker_wallet(i).address for i in (0, 1)}


def test_a_real_transfer_is_a_verified_deposit(chain: DevChain, w3: Web3, hl: HyperliquidProvider) -> None:
    user = chain.accounts[1]
    tx = _transfer(w3, user.private_key, hl.platform_address, 5 * 10**17)
    info = hl.verify_deposit(tx, sender=user.address.lower())  # mined on arrival: 1 confirmation at once
    assert (info.sender, info.recipient, info.amount) == (user.address, chain.platform.address, 5 * 10**17)
    assert info.succeeded and info.confirmations == 1
    assert w3.eth.get_balance(chain.platform.address) == PLATFORM_BALANCE + 5 * 10**17  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="was not sent by"):
        hl.verify_deposit(tx, sender=chain.accounts[2].address)
    elsewhere = _transfer(w3, user.private_key, chain.accounts[2].address, 10**17)
    with pytest.raises(InvalidRequest, match="not sent to the platform"):
        hl.verify_deposit(elsewhere)


def test_a_payout_lands_on_chain_once(chain: DevChain, w3: Web3, hl: HyperliquidProvider) -> None:
    wallet = worker_wallet(0).address
    nonce = hl.next_nonce()
    signed = hl.sign_payout(to=wallet, amount=123_456, nonce=nonce)
    assert hl.payout_state(signed.tx_id) is PayoutState.NOT_FOUND
    hl.broadcast(signed)
    assert hl.payout_state(signed.tx_id) is PayoutState.CONFIRMED
    hl.broadcast(signed)  # the same bytes again (a lost answer's retry): no error, no second transfer
    assert w3.eth.get_balance(wallet) == 123_456  # type: ignore[arg-type]
    assert hl.next_nonce() == nonce + 1
    tx = w3.eth.get_transaction(signed.tx_id)  # type: ignore[arg-type]
    assert (tx["from"], tx["chainId"]) == (chain.platform.address, DEFAULT_CHAIN_ID)  # type: ignore[typeddict-item]


def test_another_chains_transaction_is_refused_with_nothing_changed(chain: DevChain, w3: Web3) -> None:
    user = chain.accounts[1]
    before = (w3.eth.get_balance(user.address), w3.eth.get_transaction_count(user.address),  # type: ignore[arg-type]
              w3.eth.block_number)
    for other in (999, 1):  # HyperEVM mainnet, Ethereum mainnet
        with pytest.raises(Exception, match="invalid chain id"):
            _transfer(w3, user.private_key, chain.platform.address, 10**17, chain_id=other)
    after = (w3.eth.get_balance(user.address), w3.eth.get_transaction_count(user.address),  # type: ignore[arg-type]
             w3.eth.block_number)
    assert after == before


def test_json_rpc_batches_notifications_and_errors(chain: DevChain) -> None:
    answer = _rpc(chain.url, [
        {"jsonrpc": "2.0", "id": 7, "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # a notification: no answer
        {"jsonrpc": "2.0", "id": "b", "method": "eth_noSuchMethod", "params": []},
        {"jsonrpc": "2.0", "id": 9, "method": "eth_getBalance", "params": "not a list"},
        42,
    ]).json()
    assert answer[0] == {"jsonrpc": "2.0", "id": 7, "result": hex(DEFAULT_CHAIN_ID)}
    assert answer[1]["id"] == "b" and isinstance(answer[1]["error"]["code"], int)
    assert answer[2]["id"] == 9 and answer[2]["error"]["code"] == -32602
    assert answer[3]["error"]["code"] == -32600
    assert len(answer) == 4
    assert _rpc(chain.url, []).json()["error"]["code"] == -32600
    parse = requests.post(chain.url, data=b"{nope", headers={"Content-Type": "application/json"}, timeout=10)
    assert parse.json()["error"]["code"] == -32700
    assert requests.get(chain.url, timeout=10).status_code == 405


def test_a_web_page_cannot_spend_the_unlocked_accounts(chain: DevChain, w3: Web3) -> None:
    """The test accounts are unlocked (eth_sendTransaction), as on anvil. A page in the user's browser can
    POST to loopback without a preflight only as text/plain, and a DNS-rebinding page names its own Host:
    both are refused, and nothing moves."""
    victim, thief = chain.accounts[0].address, Account.create().address
    send = {"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
            "params": [{"from": victim, "to": thief, "value": hex(10**18)}]}
    plain = requests.post(chain.url, data=json.dumps(send), timeout=10,
                          headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    rebound = _rpc(chain.url, send, Host=f"evil.example:{chain.url.rsplit(':', 1)[1]}")
    assert rebound.status_code == 403
    assert w3.eth.get_balance(thief) == 0  # type: ignore[arg-type]
    assert w3.eth.get_transaction_count(victim) == 0  # type: ignore[arg-type]
    # The same request, from a program on this machine, works: that is what the accounts are for.
    assert "result" in _rpc(chain.url, send).json()
    assert w3.eth.get_balance(thief) == 10**18  # type: ignore[arg-type]


def test_refuses_non_loopback_binds_unless_asked() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(ValueError, match="loopback only"):
            start_devchain(host)
    with start_devchain("0.0.0.0", allow_remote=True) as c:  # asked for: serves, and says where
        assert c.url.startswith("http://0.0.0.0:")
        url = "http://127.0.0.1:" + c.url.rsplit(":", 1)[1]
        assert _rpc(url, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).json()["result"] == "0x7a69"


def test_rpc_down_is_a_chain_error(chain: DevChain, hl: HyperliquidProvider) -> None:
    chain.stop()
    with pytest.raises(ChainError):
        hl.next_nonce()


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    info_file = tmp_path / "chain.json"
    proc = subprocess.Popen([sys.executable, "-m", "azu.payments.devchain", "--port", "0", "--workers", "2",
                             "--info-file", str(info_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not info_file.exists():  # written once the server listens
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the dev chain did not start within 60s"
            time.sleep(0.1)
        info = json.loads(info_file.read_text())
        assert info["chain_id"] == DEFAULT_CHAIN_ID and len(info["worker_wallets"]) == 2
        env = core_env(info)  # what `azu up` gives its core processes
        hl = HyperliquidProvider(rpc_url=env["HYPERLIQUID_RPC_URL"], private_key=env["SCHEDULER_PRIVATE_KEY"],
                                 platform_address=env["HYPERLIQUID_ADDRESS"],
                                 chain_id=int(env["HYPERLIQUID_CHAIN_ID"]))
        assert hl.payout_address == info["platform_address"]
        wallet = info["worker_wallets"]["local-1"]
        signed = hl.sign_payout(to=wallet, amount=10**15, nonce=hl.next_nonce())
        hl.broadcast(signed)
        assert hl.payout_state(signed.tx_id) is PayoutState.CONFIRMED
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    text = out.decode()
    assert "never use on a real chain" in text and info["accounts"][0]["private_key"] in text
    assert not info_file.exists()  # a stopped chain leaves no file that says it is up
