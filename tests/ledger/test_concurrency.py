"""50 threads, each with its own session and connection, released at once by a barrier: exactly one effect."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from azu.billing.ledger import service
from azu.billing.ledger.billing import run_in_transaction
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import Deposit, JournalTransaction, Payout
from azu.errors import AzuError

pytestmark = pytest.mark.postgres

N = 50
ALICE = "0x00000000000000000000000000000000000A11CE"
WALLET = "0x000000000000000000000000000000000000F00D"


def race(engine: Engine, fn: Callable[[Session], object]) -> Counter[str]:
    """Run ``fn`` in N threads at once, each in its own transaction; count outcomes by result/error class."""
    barrier = threading.Barrier(N, timeout=60)

    def one(_: int) -> str:
        barrier.wait()
        try:
            run_in_transaction(engine, fn)
        except AzuError as exc:
            return type(exc).__name__
        return "ok"

    with ThreadPoolExecutor(max_workers=N) as pool:
        return Counter(pool.map(one, range(N)))


def count(engine: Engine, query) -> int:  # type: ignore[no-untyped-def]
    with session_scope(engine) as s:
        return s.execute(query).scalar_one()


def test_50_concurrent_credits_of_the_same_tx_credit_once(engine: Engine) -> None:
    outcomes = race(
        engine,
        lambda s: service.credit_deposit(s, tx_id="0xsame", sender=ALICE, amount=777, refuse_replay=True),
    )
    assert outcomes == Counter({"ok": 1, "Conflict": N - 1})
    with session_scope(engine) as s:
        assert service.user_balance(s, ALICE) == 777
    assert count(engine, select(func.count()).select_from(Deposit)) == 1


def test_50_concurrent_settlements_of_the_same_job_settle_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        service.credit_deposit(s, tx_id="0xfund", sender=ALICE, amount=10_000)
        service.place_hold(s, job_id="job-1", user_address=ALICE, amount=5_000, price=2)
    outcomes = race(engine, lambda s: service.settle_hold(s, job_id="job-1", usage={"a": 600, "b": 400}))
    assert outcomes == Counter({"ok": N})  # every caller sees success; only one moved money
    with session_scope(engine) as s:
        assert service.user_balance(s, ALICE) == 10_000 - 2_000
        assert service.balance(s, service.worker_account(s, "a")) == 960
        assert service.balance(s, service.worker_account(s, "b")) == 640
        assert service.balance(s, service.platform_account(s)) == 400
    settles = select(func.count()).select_from(JournalTransaction).where(JournalTransaction.kind == "settle")
    assert count(engine, settles) == 1


def test_50_concurrent_holds_never_overdraw(engine: Engine) -> None:
    with session_scope(engine) as s:
        service.credit_deposit(s, tx_id="0xfund", sender=ALICE, amount=1_000)
    counter = iter(range(N))
    lock = threading.Lock()

    def hold(s: Session) -> None:
        with lock:
            n = next(counter)
        service.place_hold(s, job_id=f"job-{n}", user_address=ALICE, amount=100, price=1)

    outcomes = race(engine, hold)
    assert outcomes == Counter({"ok": 10, "PaymentRequired": N - 10})
    with session_scope(engine) as s:
        assert service.user_balance(s, ALICE) == 0
        assert service.held_for(s, ALICE) == 1_000


def test_50_concurrent_payouts_for_one_worker_debit_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        service.credit_deposit(s, tx_id="0xfund", sender=ALICE, amount=10_000)
        service.place_hold(s, job_id="j", user_address=ALICE, amount=10_000, price=1)
        service.settle_hold(s, job_id="j", usage={"w": 5_000})  # w earns 4_000
        service.set_worker_wallet(s, "w", WALLET)
    outcomes = race(
        engine, lambda s: service.create_payout(s, worker_id="w", amount=4_000, to_address=WALLET)
    )
    assert outcomes["ok"] == 1
    assert outcomes["ok"] + outcomes["Conflict"] + outcomes["PaymentRequired"] == N
    assert count(engine, select(func.count()).select_from(Payout)) == 1
    with session_scope(engine) as s:
        assert service.balance(s, service.worker_account(s, "w")) == 0
        assert service.balance(s, service.payouts_account(s)) == 4_000
