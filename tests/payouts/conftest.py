"""Payout fixtures: the real PostgreSQL (a fresh database per test run, migrated with the ledger's alembic
scripts) and a real in-process EVM (py-evm through web3's EthereumTesterProvider), wrapped so tests can
inject RPC faults at the JSON-RPC boundary the provider talks to.

After every test: no payout is left open, all accounts sum to zero, every worker wallet holds on chain
exactly what the ledger says was paid to it, and the platform's chain balance equals what the ledger says
it holds (deposits minus confirmed payouts) minus the gas it spent.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine, create_engine, text
from web3 import EthereumTesterProvider, Web3

from azu.billing.ledger import service
from azu.billing.ledger.db import make_engine, migrate, session_factory, session_scope
from azu.payments.hyperliquid import HyperliquidProvider
from azu.payments.payouts import PayoutRunner

pytestmark = [pytest.mark.postgres, pytest.mark.chain]

ADMIN_URL = os.environ.get("AZU_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
LEDGER_TABLES = ("journal_entries, deposits, job_usage, payouts, journal_transactions, jobs, workers, "
                 "accounts, api_keys, auth_challenges")
THRESHOLD = 10**15  # 0.001 HYPE
FUNDING = 10**21  # what the payout (= platform) account starts with on chain


class Crash(BaseException):
    """Raised by the fault injector to stand for the process dying at that instant."""


class FaultyChain(EthereumTesterProvider):
    """The real eth-tester provider with faults injected per JSON-RPC call (the node/transport boundary)."""

    Crash = Crash  # tests reach it here: this conftest is imported under two module names

    def __init__(self) -> None:
        super().__init__()
        self.reset_faults()

    def reset_faults(self) -> None:
        self.down = False  # every request fails as if the node were unreachable
        self.refuse_sends = 0  # the next N eth_sendRawTransaction fail before reaching the chain
        self.lose_send_answers = 0  # the next N sends execute on chain, then their answer is lost
        self.down_after_send = False  # ... and the node stays unreachable afterwards
        self.crash_after_send = 0  # the next N sends execute, then the process "dies"
        self.pending_nonce_skew = 0  # added to eth_getTransactionCount(..., "pending") answers
        self.fail_methods: set[str] = set()  # these methods fail as if the node were unreachable
        self.before_send: Callable[[], None] | None = None

    def make_request(self, method: Any, params: Any) -> Any:
        if self.down or method in self.fail_methods:
            raise requests.ConnectionError(f"injected: {method} unreachable")
        if method == "eth_sendRawTransaction":
            if self.before_send is not None:
                self.before_send()
            if self.refuse_sends:
                self.refuse_sends -= 1
                raise requests.ConnectionError("injected: connection reset before the node got it")
            response = super().make_request(method, params)
            if self.crash_after_send:
                self.crash_after_send -= 1
                raise Crash("injected: process died right after sending")
            if self.lose_send_answers:
                self.lose_send_answers -= 1
                self.down = self.down_after_send
                raise requests.ReadTimeout("injected: answer lost after sending")
            return response
        response = super().make_request(method, params)
        if method == "eth_getTransactionCount" and params[1] == "pending" and self.pending_nonce_skew:
            response = {**response, "result": response["result"] + self.pending_nonce_skew}
        return response


@dataclass
class Env:
    engine: Engine
    chain: FaultyChain
    w3: Web3
    scheduler: LocalAccount
    provider: HyperliquidProvider
    wallets: dict[str, str] = field(default_factory=dict)  # worker id -> wallet

    def runner(self) -> PayoutRunner:
        """A fresh runner: what a new worker process (or one restarted after a crash) would build."""
        return PayoutRunner(session_factory(self.engine), self.provider, threshold=THRESHOLD)

    def earn(self, worker_id: str, amount: int, *, wallet: str | None = None) -> str:
        """Make ``worker_id`` earn ``amount`` wei through the real path: a user deposits on chain, the
        deposit is verified and credited, a job is held and settled with the worker's usage."""
        assert amount % 4 == 0  # the worker's 80 % of a charge of amount * 5/4
        charge = amount * 5 // 4
        user = self.w3.eth.accounts[1]
        platform = self.provider.platform_address
        tx = self.w3.eth.send_transaction({"from": user, "to": platform, "value": charge})
        info = self.provider.verify_deposit(tx.to_0x_hex(), sender=user)
        wallet = wallet or self.wallets.get(worker_id) or Account.create().address
        self.wallets[worker_id] = wallet
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        with session_scope(self.engine) as s:
            service.credit_deposit(s, tx_id=info.tx_id, sender=info.sender, amount=info.amount)
            service.set_worker_wallet(s, worker_id, wallet)
            service.hold_job(s, job_id=job_id, user_address=info.sender, amount=charge, price=charge)
            service.settle_job(s, job_id=job_id, usage={worker_id: 1})
        return wallet

    def worker_balance(self, worker_id: str) -> int:
        with session_scope(self.engine) as s:
            return service.balance(s, service.worker_account(s, worker_id))

    def payouts(self) -> list[tuple[str, int, str, str | None]]:
        """(worker, amount, status, tx id) of every payout, oldest first."""
        with session_scope(self.engine) as s:
            return [(p.worker_id, int(p.amount), p.status, p.tx_id) for p in service.payouts_in(s)]

    def transfers_to(self, address: str) -> list[str]:
        """Hashes of every mined transaction that moved value to ``address``."""
        found = []
        for number in range(self.w3.eth.block_number + 1):
            for tx in self.w3.eth.get_block(number, full_transactions=True)["transactions"]:
                if tx["to"] == address and tx["value"] > 0:  # type: ignore[index]
                    found.append(tx["hash"].to_0x_hex())  # type: ignore[index]
        return found

    def scheduler_txs(self) -> int:
        return self.w3.eth.get_transaction_count(self.scheduler.address, "latest")

    def gas_spent(self, address: str) -> int:
        spent = 0
        for number in range(self.w3.eth.block_number + 1):
            for tx in self.w3.eth.get_block(number, full_transactions=True)["transactions"]:
                if tx["from"] == address:  # type: ignore[index]
                    receipt = self.w3.eth.get_transaction_receipt(tx["hash"])  # type: ignore[index]
                    spent += receipt["gasUsed"] * receipt["effectiveGasPrice"]
        return spent


def _admin() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    name = f"azu_payouts_{secrets.token_hex(6)}"
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    eng = make_engine(url, pool_size=5, max_overflow=5)
    try:
        migrate(url)
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
        _check_books_and_chain(e)
    finally:  # a clean slate for the next test even when this one failed
        with session_scope(engine) as s:
            s.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))


def _check_books_and_chain(e: Env) -> None:
    with session_scope(e.engine) as s:
        total = s.execute(text("SELECT coalesce(sum(balance), 0) FROM accounts")).scalar_one()
        open_payouts = service.payouts_in(s, "pending", "sent")
        in_flight = service.balance(s, service.payouts_account(s))
        chain_balance = service.balance(s, service.chain_account(s))
        confirmed: dict[str, int] = {}
        for p in service.payouts_in(s, "confirmed"):
            confirmed[p.to_address] = confirmed.get(p.to_address, 0) + int(p.amount)
    assert total == 0, f"ledger accounts sum to {total}"
    assert not open_payouts, f"payouts left open: {[(p.id, p.status) for p in open_payouts]}"
    assert in_flight == 0
    for worker_id, wallet in e.wallets.items():
        assert e.w3.eth.get_balance(wallet) == confirmed.get(wallet, 0), f"worker {worker_id}'s wallet"
    # The ledger's outside-chain account is minus (deposits - confirmed payouts): what the platform holds.
    platform = e.provider.platform_address
    assert e.w3.eth.get_balance(platform) == FUNDING - e.gas_spent(platform) - chain_balance
