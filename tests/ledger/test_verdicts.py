"""Verified work's money on the real PostgreSQL: a worker whose numbers failed verification has its credit for
the job withheld (into its withheld account, with the reason in the journal), the user is refunded, the
verdict is kept with its evidence, and a frozen worker is paid nothing. The books are checked after every
test by the ``books_balance`` fixture (all accounts sum to zero, none below zero, every transaction balances).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from azu.billing.base import FreeBilling, JobNotSettled
from azu.billing.ledger import service
from azu.billing.ledger.billing import LedgerBilling
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import JournalTransaction, Verdict
from azu.errors import Conflict, InvalidRequest, NotFound
from tests.ledger.test_service import ALICE, BOB, WALLET, fund, kind_balance

pytestmark = pytest.mark.postgres

EVIDENCE = {"hop": 1, "chunk": 3, "max_difference": 41.5, "expected": "ab12", "got": "cd34"}
REASON = "hop 1 hidden states differ from the re-computation at chunk 3"


def _settled_job(engine: Engine, job_id: str, usage: dict[str, int], *, user: str = ALICE,
                 hold: int = 4_000, price: int = 2) -> None:
    fund(engine, user, hold, tx=f"0xfund-{job_id}")
    with session_scope(engine) as s:
        service.place_hold(s, job_id=job_id, user_address=user, amount=hold, price=price)
        service.settle_hold(s, job_id=job_id, usage=usage)


def _platform_reserve(engine: Engine, amount: int) -> None:
    """``amount`` more in the platform account: its 20 % of an earlier job (BOB's, run by 'other')."""
    _settled_job(engine, f"reserve-{amount}", {"other": amount}, user=BOB, hold=amount * 5, price=5)


def _books(engine: Engine) -> dict[tuple[str, str], int]:
    with session_scope(engine) as s:
        rows = s.execute(text("SELECT kind, owner, balance FROM accounts")).all()
    return {(kind, owner): int(balance) for kind, owner, balance in rows}


def _journal(engine: Engine, kind: str) -> list[tuple[str, str]]:
    with session_scope(engine) as s:
        rows = s.execute(
            select(JournalTransaction.idempotency_key, JournalTransaction.memo)
            .where(JournalTransaction.kind == kind)
            .order_by(JournalTransaction.id)
        ).all()
    return [(key, memo or "") for key, memo in rows]


def _verdicts(engine: Engine, **where: str) -> list[Verdict]:
    with session_scope(engine) as s:
        return service.verdicts(s, **where)


def _withhold(engine: Engine, job_id: str, worker_id: str, **kw: Any) -> Verdict:
    with session_scope(engine) as s:
        return service.withhold_job_earnings(
            s, job_id=job_id, worker_id=worker_id, reason=kw.get("reason", REASON),
            evidence=kw.get("evidence", EVIDENCE))


def test_withhold_moves_exactly_the_credit_refunds_the_user_and_keeps_the_verdict(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    # 1000 token-layers at 2 = 2000: platform 400, workers 1600 split 3:1 (cheat 1200, honest 400)
    _settled_job(engine, "j1", {"cheat": 750, "honest": 250})
    before = _books(engine)
    assert before[("user", ALICE)] == 2_000 and before[("platform", "")] == 2_400

    billing = LedgerBilling(engine, price_per_token_layer=2)
    billing.withhold(job_id="j1", worker_id="cheat", reason=REASON, evidence=EVIDENCE)

    after = _books(engine)
    assert after[("worker", "cheat")] == before[("worker", "cheat")] - 1_200 == 0
    assert after[("withheld", "cheat")] == 1_200
    assert after[("worker", "honest")] == before[("worker", "honest")] == 400
    assert after[("user", ALICE)] == before[("user", ALICE)] + 2_000  # the whole charge back
    assert after[("platform", "")] == before[("platform", "")] - 2_000
    changed = {k for k in after if after[k] != before.get(k, 0)}
    assert changed == {("worker", "cheat"), ("withheld", "cheat"), ("user", ALICE), ("platform", "")}

    [(key, memo)] = _journal(engine, "withhold")
    assert key == "job:j1:withhold:cheat" and REASON in memo and "1200 credited" in memo
    [(key, memo)] = _journal(engine, "refund")
    assert key == "job:j1:refund" and "2000 of 2000" in memo and "cheat" in memo and REASON in memo

    [verdict] = _verdicts(engine, job_id="j1")
    assert (verdict.worker_id, verdict.outcome, verdict.reason) == ("cheat", "failed", REASON)
    assert verdict.evidence == EVIDENCE
    amounts = (verdict.credited, verdict.withheld, verdict.shortfall, verdict.refunded)
    assert amounts == (1_200, 1_200, 0, 2_000)
    assert verdict.withhold_transaction_id is not None and verdict.refund_transaction_id is not None
    assert verdict.created_at is not None


def test_withhold_twice_changes_nothing(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"cheat": 750, "honest": 250})
    billing = LedgerBilling(engine, price_per_token_layer=2)
    billing.withhold(job_id="j1", worker_id="cheat", reason=REASON, evidence=EVIDENCE)
    once = _books(engine)
    with session_scope(engine) as s:
        journal_count = s.execute(select(func.count()).select_from(JournalTransaction)).scalar_one()
    billing.withhold(job_id="j1", worker_id="cheat", reason="another reason", evidence={"hop": 9})
    assert _books(engine) == once
    with session_scope(engine) as s:
        assert s.execute(select(func.count()).select_from(JournalTransaction)).scalar_one() == journal_count
    [verdict] = _verdicts(engine)
    assert verdict.reason == REASON and verdict.evidence == EVIDENCE  # the first verdict stands


def test_concurrent_duplicate_verdicts_post_once(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"cheat": 750, "honest": 250})
    billing = LedgerBilling(engine, price_per_token_layer=2)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def verdict() -> None:
        try:
            start.wait()
            billing.withhold(job_id="j1", worker_id="cheat", reason=REASON, evidence=EVIDENCE)
        except BaseException as exc:  # reported below, with the thread's own exception
            errors.append(exc)

    threads = [threading.Thread(target=verdict) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(_verdicts(engine)) == 1
    assert len(_journal(engine, "withhold")) == 1 and len(_journal(engine, "refund")) == 1
    assert kind_balance(engine, "withheld", "cheat") == 1_200
    assert kind_balance(engine, "user", ALICE) == 4_000


def test_a_worker_already_paid_out_loses_what_is_left_and_the_shortfall_is_recorded(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"cheat": 750, "honest": 250})  # cheat credited 1200
    with session_scope(engine) as s:
        service.set_worker_wallet(s, "cheat", WALLET)
        service.create_payout(s, worker_id="cheat", amount=1_000, to_address=WALLET)  # 200 left
    _withhold(engine, "j1", "cheat")
    assert kind_balance(engine, "worker", "cheat") == 0
    assert kind_balance(engine, "withheld", "cheat") == 200
    [verdict] = _verdicts(engine)
    assert (verdict.credited, verdict.withheld, verdict.shortfall) == (1_200, 200, 1_000)
    [(_, memo)] = _journal(engine, "withhold")
    assert "1000 already paid out" in memo
    assert verdict.refunded == 2_000  # the user's refund does not depend on what the worker still holds
    with session_scope(engine) as s:  # leave no payout open (the payout tests' books check it)
        [payout] = service.payouts_in(s, "pending")
        service.mark_failed(s, payout.id, "test over")


def test_refund_stops_at_the_platforms_balance_and_says_so(engine: Engine) -> None:
    _settled_job(engine, "j1", {"cheat": 750, "honest": 250})  # the platform holds only this job's 400
    verdict = _withhold(engine, "j1", "cheat")
    assert verdict.refunded == 400
    assert kind_balance(engine, "platform") == 0
    assert kind_balance(engine, "user", ALICE) == 2_000 + 400
    [(_, memo)] = _journal(engine, "refund")
    assert "400 of 2000" in memo and "short by 1600" in memo


def test_a_job_is_refunded_once_however_many_of_its_workers_fail(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"a": 750, "b": 250})
    first = _withhold(engine, "j1", "a")
    second = _withhold(engine, "j1", "b", reason="hop 2 returned its input unchanged")
    assert (first.refunded, second.refunded) == (2_000, 0)
    assert first.refund_transaction_id is not None and second.refund_transaction_id is None
    assert kind_balance(engine, "withheld", "a") == 1_200 and kind_balance(engine, "withheld", "b") == 400
    assert kind_balance(engine, "user", ALICE) == 4_000
    assert [v.worker_id for v in _verdicts(engine, job_id="j1")] == ["a", "b"]
    assert [v.worker_id for v in _verdicts(engine, worker_id="b")] == ["b"]


def test_a_worker_without_usage_in_the_job_is_credited_zero_and_the_verdict_kept(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"a": 1_000})
    verdict = _withhold(engine, "j1", "stranger")
    assert (verdict.credited, verdict.withheld, verdict.refunded) == (0, 0, 2_000)
    assert "no credit recorded" in _journal(engine, "withhold")[0][1]


def test_withhold_before_settlement_or_for_an_unknown_job_writes_nothing(engine: Engine) -> None:
    fund(engine, ALICE, 4_000)
    with session_scope(engine) as s:
        service.place_hold(s, job_id="j1", user_address=ALICE, amount=4_000, price=2)
    before = _books(engine)
    with pytest.raises(JobNotSettled) as err:
        _withhold(engine, "j1", "cheat")
    assert err.value.status == 409 and err.value.code == "job_not_settled"
    with pytest.raises(NotFound):
        _withhold(engine, "nope", "cheat")
    assert _books(engine) == before and _verdicts(engine) == []
    assert _journal(engine, "withhold") == [] and _journal(engine, "refund") == []
    # after settlement the same verdict goes through
    with session_scope(engine) as s:
        service.settle_hold(s, job_id="j1", usage={"cheat": 1_000})
    assert _withhold(engine, "j1", "cheat").withheld == 1_600


class _Scalar:
    """What a numpy or torch scalar looks like to the ledger: a number behind ``.item()``."""

    def item(self) -> float:
        return 0.25


def test_evidence_is_a_small_json_object_kept_as_plain_json(engine: Engine) -> None:
    _platform_reserve(engine, 2_000)
    _settled_job(engine, "j1", {"a": 1_000})
    for bad in ([1, 2], {"blob": "x" * 20_000}):
        with pytest.raises(InvalidRequest):
            _withhold(engine, "j1", "a", evidence=bad)
    with pytest.raises(InvalidRequest):
        _withhold(engine, "j1", "a", reason="  ")
    assert _verdicts(engine) == []
    verdict = _withhold(engine, "j1", "a", evidence={"max_difference": float("inf"), "d": [float("nan"), 1.0],
                                                    "scale": _Scalar(), "digest": b"\x01", 7: None})
    assert verdict.evidence == {"max_difference": "inf", "d": ["nan", 1.0], "scale": 0.25,
                                "digest": "b'\\x01'", "7": None}


def test_withheld_accounts_name_their_worker(engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="owner_matches_kind"), session_scope(engine) as s:
        s.execute(text("INSERT INTO accounts (kind, owner) VALUES ('withheld', '')"))
    with pytest.raises(DBAPIError, match="kind_known"), session_scope(engine) as s:
        s.execute(text("INSERT INTO accounts (kind, owner) VALUES ('confiscated', 'w')"))


# ------------------------------------------------------------------------------------------- freezing


def _earn(engine: Engine, worker: str, amount: int) -> None:
    _settled_job(engine, f"earn-{worker}-{amount}", {worker: amount * 5 // 4}, hold=amount * 5 // 4, price=1)
    with session_scope(engine) as s:
        service.set_worker_wallet(s, worker, WALLET)


def test_a_frozen_worker_is_not_due_and_cannot_be_paid_until_cleared(engine: Engine) -> None:
    _earn(engine, "w1", 800)
    _earn(engine, "w2", 800)
    billing = LedgerBilling(engine, price_per_token_layer=1)
    billing.freeze_worker(worker_id="w1", reason="3 failed verifications")
    billing.freeze_worker(worker_id="w1", reason="a later reason")  # idempotent: the first reason stays
    with session_scope(engine) as s:
        assert [w for w, _, _ in service.workers_due(s, 100)] == ["w2"]
        with pytest.raises(Conflict, match="frozen: 3 failed verifications"):
            service.create_payout(s, worker_id="w1", amount=800, to_address=WALLET)
        worker = s.execute(text("SELECT frozen_reason, frozen_at FROM workers WHERE id = 'w1'")).one()
    assert worker.frozen_reason == "3 failed verifications" and worker.frozen_at is not None
    assert kind_balance(engine, "worker", "w1") == 800  # frozen, not taken

    billing.unfreeze_worker(worker_id="w1")
    with session_scope(engine) as s:
        assert [w for w, _, _ in service.workers_due(s, 100)] == ["w1", "w2"]
    with pytest.raises(NotFound):
        billing.unfreeze_worker(worker_id="nobody")


def test_freezing_reverses_a_payout_written_but_never_signed(engine: Engine) -> None:
    _earn(engine, "w1", 800)
    with session_scope(engine) as s:
        payout = service.create_payout(s, worker_id="w1", amount=800, to_address=WALLET)
    assert kind_balance(engine, "worker", "w1") == 0
    with session_scope(engine) as s:
        service.freeze_worker(s, worker_id="w1", reason="caught")
    with session_scope(engine) as s:
        [p] = service.payouts_in(s)
        assert (p.id, p.status) == (payout.id, "reversed") and "frozen" in (p.failure_reason or "")
    assert kind_balance(engine, "worker", "w1") == 800


def test_free_billing_verdicts_are_no_ops() -> None:
    free = FreeBilling()
    assert free.withhold(job_id="j", worker_id="w", reason="r", evidence={}) is None
    assert free.freeze_worker(worker_id="w", reason="r") is None
