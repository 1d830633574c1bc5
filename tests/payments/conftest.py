"""Payment-provider fixtures: a real in-process EVM (web3's EthereumTesterProvider over py-evm)."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import EthereumTesterProvider, Web3

from azu.payments.hyperliquid import HyperliquidProvider


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def scheduler(w3: Web3) -> LocalAccount:
    """The payout account: a fresh key (as SCHEDULER_PRIVATE_KEY would be), funded from a tester account."""
    account = Account.create()
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": account.address, "value": 10**21})
    return account


@pytest.fixture
def hl(w3: Web3, scheduler: LocalAccount) -> HyperliquidProvider:
    # The platform (deposit) address defaults to the scheduler key's address.
    return HyperliquidProvider(web3=w3, private_key=scheduler.key.to_0x_hex())
