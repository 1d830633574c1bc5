"""The ledger service on the real PostgreSQL: deposits, holds, settlement, payouts, keys, and the database's
own refusal of anything that would break the books."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from azu.billing import accounts
from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import Hold, JournalTransaction, Payout, PayoutStatus
from azu.errors import Conflict, InvalidRequest, NotFound, PaymentRequired, Unauthorized

pytestmark = pytest.mark.postgres

ALICE = "0x00000000000000000000000000000000000A11CE"
BOB = "0x0000000000000000000000000000000000000B0B"
WALLET = "0x000000000000000000000000000000000000F00D"


def fund(engine: Engine, address: str, amount: int, tx: str | None = None) -> None:
    with session_scope(engine) as s:
        service.credit_deposit(s, tx_id=tx or f"0xdep-{address}-{amount}", sender=address, amount=amount)


def bal(engine: Engine, address: str) -> int:
    with session_scope(engine) as s:
        return service.user_balance(s, address)


def kind_balance(engine: Engine, kind: str, owner: str = "") -> int:
    with session_scope(engine) as s:
        return (
            s.execute(
                text("SELECT coalesce(balance, 0) FROM accounts WHERE kind = :k AND owner = :o"),
                {"k": kind, "o": owner},
            ).scalar_one_or_none()
            or 0
        )


# ------------------------------------------------------------------------------------------ deposits


def test_deposit_credits_the_sender_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        first = service.credit_deposit(s, tx_id="0xaa", sender=ALICE, amount=10**18)
    with session_scope(engine) as s:
        again = service.credit_deposit(s, tx_id="0xaa", sender=ALICE, amount=10**18)
    assert again.id == first.id
    assert bal(engine, ALICE) == 10**18
    assert kind_balance(engine, "chain") == -(10**18)
    with session_scope(engine) as s, pytest.raises(Conflict, match="already credited"):
        service.credit_deposit(s, tx_id="0xaa", sender=ALICE, amount=10**18, refuse_replay=True)
    assert bal(engine, ALICE) == 10**18


def test_deposit_rejects_non_positive_and_float_amounts(session: Session) -> None:
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InvalidRequest):
            service.credit_deposit(session, tx_id="0xbb", sender=ALICE, amount=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ jobs


def test_hold_is_refused_with_402_and_amounts_when_funds_are_short(engine: Engine) -> None:
    fund(engine, ALICE, 100)
    with session_scope(engine) as s, pytest.raises(PaymentRequired) as err:
        service.place_hold(s, job_id="j1", user_address=ALICE, amount=150)
    assert err.value.status == 402
    assert "150" in err.value.message and "100" in err.value.message
    assert bal(engine, ALICE) == 100
    with session_scope(engine) as s:
        assert s.get(Hold, "j1") is None  # nothing of the refused hold was written


def test_hold_then_settle_charges_usage_splits_80_20_and_returns_the_rest(engine: Engine) -> None:
    fund(engine, ALICE, 10_000)
    with session_scope(engine) as s:
        job = service.place_hold(s, job_id="j1", user_address=ALICE, amount=4_000, model_id="m", price=2)
        assert job.status == "held"
    assert bal(engine, ALICE) == 6_000
    assert kind_balance(engine, "holds") == 4_000
    # 1000 token-layers at 2 = 2000: platform 400, workers 1600 split 3:1
    with session_scope(engine) as s:
        job = service.settle_hold(s, job_id="j1", usage={"gpu-a": 750, "gpu-b": 250})
    assert (job.status, job.charged) == ("settled", 2_000)
    assert bal(engine, ALICE) == 8_000
    assert kind_balance(engine, "holds") == 0
    assert kind_balance(engine, "platform") == 400
    assert kind_balance(engine, "worker", "gpu-a") == 1_200
    assert kind_balance(engine, "worker", "gpu-b") == 400
    with session_scope(engine) as s:
        assert service.job_usage(s, "j1") == {"gpu-a": (750, 1_200), "gpu-b": (250, 400)}
    # settling again (even with other numbers) changes nothing
    with session_scope(engine) as s:
        job = service.settle_hold(s, job_id="j1", usage={"gpu-a": 1})
    assert job.charged == 2_000
    assert bal(engine, ALICE) == 8_000
    assert kind_balance(engine, "worker", "gpu-a") == 1_200


def test_settlement_rounding_with_three_workers_is_exact(engine: Engine) -> None:
    fund(engine, ALICE, 1_000)
    with session_scope(engine) as s:
        service.place_hold(s, job_id="j", user_address=ALICE, amount=1_000, price=1)
        service.settle_hold(s, job_id="j", usage={"a": 1, "b": 1, "c": 5})  # 7: platform 1, workers 6
    assert kind_balance(engine, "platform") == 1
    # 6 * 1/7 = 0.857, 6 * 5/7 = 4.29: floors 0, 0, 4 with 2 left for the largest remainders (a, b)
    assert [kind_balance(engine, "worker", w) for w in ("a", "b", "c")] == [1, 1, 4]
    assert bal(engine, ALICE) == 993


def test_charge_above_the_hold_is_capped(engine: Engine) -> None:
    fund(engine, ALICE, 100)
    with session_scope(engine) as s:
        service.place_hold(s, job_id="j", user_address=ALICE, amount=50, price=2)
        job = service.settle_hold(s, job_id="j", usage={"a": 1_000})
    assert job.charged == 50
    assert bal(engine, ALICE) == 50
    assert kind_balance(engine, "platform") + kind_balance(engine, "worker", "a") == 50


def test_release_and_idempotency_of_hold_release_settle(engine: Engine) -> None:
    fund(engine, ALICE, 100)
    with session_scope(engine) as s:
        service.place_hold(s, job_id="j", user_address=ALICE, amount=60, price=2)
        service.place_hold(s, job_id="j", user_address=ALICE, amount=60, price=2)  # same hold again: no-op
    assert bal(engine, ALICE) == 40
    with session_scope(engine) as s, pytest.raises(Conflict):
        service.place_hold(s, job_id="j", user_address=BOB, amount=60)
    with session_scope(engine) as s:
        assert service.release_hold(s, job_id="j").status == "released"
        service.release_hold(s, job_id="j")
        assert service.settle_hold(s, job_id="j", usage={"a": 10}).status == "released"
    assert bal(engine, ALICE) == 100
    with session_scope(engine) as s, pytest.raises(NotFound):
        service.settle_hold(s, job_id="nope", usage={})


def test_a_refused_operation_leaves_the_callers_transaction_usable(engine: Engine) -> None:
    fund(engine, ALICE, 10)
    with session_scope(engine) as s:
        with pytest.raises(PaymentRequired):
            service.place_hold(s, job_id="big", user_address=ALICE, amount=11)
        service.place_hold(s, job_id="small", user_address=ALICE, amount=10)
    assert bal(engine, ALICE) == 0


# ------------------------------------------------------------------------------------------ the database


def _raw(engine: Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def test_database_refuses_a_negative_balance_even_without_the_service(engine: Engine) -> None:
    fund(engine, ALICE, 5)
    with session_scope(engine) as s:
        user = service.user_account(s, ALICE).id
        platform = service.platform_account(s).id
    with pytest.raises(DBAPIError, match="ck_accounts_balance_not_negative"):
        _raw(
            engine,
            """WITH t AS (INSERT INTO journal_transactions (idempotency_key, kind)
                           VALUES ('evil', 'x') RETURNING id)
               INSERT INTO journal_entries (transaction_id, account_id, amount)
               SELECT id, :u, -6 FROM t UNION ALL SELECT id, :p, 6 FROM t""",
            u=user,
            p=platform,
        )
    assert bal(engine, ALICE) == 5


def test_database_refuses_unbalanced_transactions_and_direct_balance_writes(engine: Engine) -> None:
    fund(engine, ALICE, 5)
    with session_scope(engine) as s:
        user = service.user_account(s, ALICE).id
    with pytest.raises(DBAPIError, match="does not balance"):
        _raw(
            engine,
            """WITH t AS (INSERT INTO journal_transactions (idempotency_key, kind)
                           VALUES ('gift', 'x') RETURNING id)
               INSERT INTO journal_entries (transaction_id, account_id, amount) SELECT id, :u, 1000 FROM t""",
            u=user,
        )
    with pytest.raises(DBAPIError, match="only through journal_entries"):
        _raw(engine, "UPDATE accounts SET balance = balance + 1000 WHERE id = :u", u=user)
    with pytest.raises(DBAPIError, match="append-only"):
        _raw(engine, "UPDATE journal_entries SET amount = amount * 2")
    with pytest.raises(DBAPIError, match="append-only"):
        _raw(engine, "DELETE FROM journal_entries")
    with pytest.raises(DBAPIError, match="must start at balance 0"):
        _raw(engine, "INSERT INTO accounts (kind, owner, balance) VALUES ('user', 'mallory', 10)")
    assert bal(engine, ALICE) == 5


# ------------------------------------------------------------------------------------------ payouts


def _earn(engine: Engine, worker: str, amount: int) -> None:
    """Give ``worker`` exactly ``amount`` base units through a real job (amount must be a multiple of 4)."""
    charge = amount * 5 // 4
    fund(engine, BOB, charge, tx=f"0xfund-{worker}-{amount}")
    with session_scope(engine) as s:
        service.place_hold(s, job_id=f"earn-{worker}-{amount}", user_address=BOB, amount=charge, price=1)
        service.settle_hold(s, job_id=f"earn-{worker}-{amount}", usage={worker: charge})
    assert kind_balance(engine, "worker", worker) >= amount


def test_payout_lifecycle_pending_sent_confirmed(engine: Engine) -> None:
    _earn(engine, "w1", 800)
    _earn(engine, "w2", 400)
    with session_scope(engine) as s:
        service.set_worker_wallet(s, "w1", WALLET)
        service.worker_account(s, "w3")  # no wallet: never due
    with session_scope(engine) as s:
        assert service.workers_due(s, 500) == [("w1", WALLET, 800)]
        payout = service.create_payout(s, worker_id="w1", amount=800, to_address=WALLET)
    assert payout.status == "pending"
    assert kind_balance(engine, "worker", "w1") == 0
    assert kind_balance(engine, "payouts") == 800
    with session_scope(engine) as s:
        assert service.workers_due(s, 1) == []  # w1 now has nothing and a payout in flight
        with pytest.raises(Conflict, match="record_signed"):
            service.mark_sent(s, payout.id)
        service.record_signed(s, payout.id, tx_id="0xabc", nonce=7)
        signed = service.record_signed(
            s, payout.id, tx_id="0xabc", nonce=7, raw=b"\x02signed"
        )  # same tx: fine
        assert signed.raw_tx == b"\x02signed"
        with pytest.raises(Conflict, match="already has signed tx"):
            service.record_signed(s, payout.id, tx_id="0xother", nonce=8)
        with pytest.raises(Conflict, match="cannot become confirmed"):
            service.mark_confirmed(s, payout.id)
        assert service.mark_sent(s, payout.id).status == "sent"
        assert [p.id for p in service.payouts_in(s, PayoutStatus.SENT)] == [payout.id]
        assert service.mark_confirmed(s, payout.id).status == "confirmed"
        service.mark_confirmed(s, payout.id)  # idempotent
    assert kind_balance(engine, "payouts") == 0
    # the money left the system: the chain account got it back
    with session_scope(engine) as s, pytest.raises(Conflict, match="cannot become failed"):
        service.mark_failed(s, payout.id, "late error")  # would pay the worker twice
    assert kind_balance(engine, "worker", "w1") == 0


def test_failed_payout_is_reversed_to_the_worker_once(engine: Engine) -> None:
    _earn(engine, "w1", 800)
    with session_scope(engine) as s:
        service.set_worker_wallet(s, "w1", WALLET)
        payout = service.create_payout(s, worker_id="w1", amount=800, to_address=WALLET)
        with pytest.raises(Conflict, match="in flight"):
            service.create_payout(
                s, worker_id="w1", amount=1, to_address=WALLET
            )  # would need the balance anyway
        service.record_signed(s, payout.id, tx_id="0xdef", nonce=1)
        service.mark_sent(s, payout.id)
    with session_scope(engine) as s:
        p = service.mark_failed(s, payout.id, "superseded: nonce 1 taken by another tx")
        assert (p.status, p.failure_reason) == ("reversed", "superseded: nonce 1 taken by another tx")
        service.mark_failed(s, payout.id, "again")
        with pytest.raises(Conflict):
            service.mark_confirmed(s, payout.id)
    assert kind_balance(engine, "worker", "w1") == 800
    assert kind_balance(engine, "payouts") == 0
    with session_scope(engine) as s:
        # a new payout may reuse the reversed payout's nonce (it never landed)
        again = service.create_payout(s, worker_id="w1", amount=800, to_address=WALLET)
        service.record_signed(s, again.id, tx_id="0xdef2", nonce=1)


def test_payout_cannot_exceed_the_balance_and_nonces_are_unique(engine: Engine) -> None:
    _earn(engine, "w1", 400)
    _earn(engine, "w2", 400)
    with session_scope(engine) as s, pytest.raises(PaymentRequired):
        service.create_payout(s, worker_id="w1", amount=401, to_address=WALLET)
    with session_scope(engine) as s:
        a = service.create_payout(s, worker_id="w1", amount=400, to_address=WALLET)
        b = service.create_payout(s, worker_id="w2", amount=400, to_address=WALLET)
        service.record_signed(s, a.id, tx_id="0x1", nonce=3)
    with pytest.raises(DBAPIError, match="uq_payouts_live_nonce"), session_scope(engine) as s:
        service.record_signed(s, b.id, tx_id="0x2", nonce=3)
    with session_scope(engine) as s:
        assert s.get(Payout, b.id).tx_id is None  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ keys


def test_challenges_are_single_use_per_address_and_expire(engine: Engine) -> None:
    with session_scope(engine) as s:
        text_ = accounts.create_challenge(s, ALICE)
        assert ALICE in text_
    with session_scope(engine) as s, pytest.raises(Unauthorized):
        accounts.consume_challenge(s, BOB, text_)
    with session_scope(engine) as s:
        accounts.consume_challenge(s, ALICE, text_)
    with session_scope(engine) as s, pytest.raises(Unauthorized):
        accounts.consume_challenge(s, ALICE, text_)
    with session_scope(engine) as s:
        old = accounts.create_challenge(s, ALICE, ttl=timedelta(seconds=-1))
    with session_scope(engine) as s, pytest.raises(Unauthorized):
        accounts.consume_challenge(s, ALICE, old)


def test_api_keys_store_lookup_list_revoke(engine: Engine) -> None:
    with session_scope(engine) as s:
        k1 = accounts.store_api_key(s, address=ALICE, key_hash="a" * 64, label="laptop")
        accounts.store_api_key(s, address=BOB, key_hash="b" * 64, label=None)
    with session_scope(engine) as s:
        assert accounts.user_for_key_hash(s, "a" * 64) == ALICE
        assert [k.label for k in accounts.list_api_keys(s, ALICE)] == ["laptop"]
        with pytest.raises(NotFound):
            accounts.revoke_api_key(s, BOB, k1.id)
        assert accounts.revoke_api_key(s, ALICE, k1.id).revoked_at is not None
    with session_scope(engine) as s:
        assert accounts.user_for_key_hash(s, "a" * 64) is None
        assert accounts.user_for_key_hash(s, "b" * 64) == BOB


def test_every_money_movement_has_a_unique_key(engine: Engine) -> None:
    fund(engine, ALICE, 100)
    with session_scope(engine) as s:
        service.place_hold(s, job_id="j", user_address=ALICE, amount=10, price=1)
        service.settle_hold(s, job_id="j", usage={"w": 10})
        keys = (
            s.execute(select(JournalTransaction.idempotency_key).order_by(JournalTransaction.id))
            .scalars()
            .all()
        )
        assert keys == ["deposit:0xdep-" + ALICE + "-100", "job:j:hold", "job:j:settle"]
        assert s.execute(select(func.count()).select_from(JournalTransaction)).scalar_one() == 3
