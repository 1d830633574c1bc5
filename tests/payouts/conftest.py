"""Payout fixtures: the real PostgreSQL (a fresh database per test run, migrated with the ledger's alembic
scripts) and a real in-process EVM (py-evm through web3's EthereumTesterProvider), wrapped so tests can
inject RPC faults at the JSON-RPC boundary the provider talks to.

After every test: no payout is left open, all accounts sum to zero, every worker wallet holds on chain
exactly what the ledger says was paid to it, and the platform's chain balance equals what the ledger says
it holds (deposits minus confirmed payouts) minus the gas it spent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account
from sqlalchemy import Engine, text
from web3 import Web3

from azu.billing.ledger.db import session_scope
from azu.payments.hyperliquid import HyperliquidProvider
from tests.support.chain import FaultyChain
from tests.support.database import LEDGER_TABLES, migrated_engine
from tests.support.payouts import FUNDING, Env, check_books_and_chain


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    with migrated_engine("azu_payouts") as eng:
        yield eng


@pytest.fixture
def env(engine: Engine) -> Iterator[Env]:
    chain = FaultyChain()
    w3 = Web3(chain)
    scheduler = Account.create()
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": scheduler.address, "value": FUNDING})
    provider = HyperliquidProvider(web3=w3, private_key=scheduler.key.to_0x_hex())
    e = Env(engine, chain, w3, scheduler, provider)
    yield e
    chain.reset_faults()  # lift every fault before checking
    try:
        check_books_and_chain(e)
    finally:  # a clean slate for the next test even when this one failed
        with session_scope(engine) as s:
            s.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
