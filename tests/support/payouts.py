"""The payout tests' world (tests/payouts): a ledger on the real PostgreSQL and a faulty in-process chain,
with helpers that earn, pay and inspect through the real paths."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine, text
from web3 import Web3

from azu.billing.ledger import service
from azu.billing.ledger.db import session_factory, session_scope
from azu.payments.hyperliquid import HyperliquidProvider
from azu.payments.payouts import PayoutRunner
from tests.support.chain import FaultyChain

THRESHOLD = 10**15  # 0.001 HYPE
FUNDING = 10**21  # what the payout (= platform) account starts with on chain


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
            service.place_hold(s, job_id=job_id, user_address=info.sender, amount=charge, price=charge)
            service.settle_hold(s, job_id=job_id, usage={worker_id: 1})
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


def check_books_and_chain(e: Env) -> None:
    """No payout is left open, all accounts sum to zero, every worker wallet holds on chain exactly what the
    ledger says was paid to it, and the platform holds on chain what the ledger says minus its gas."""
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
