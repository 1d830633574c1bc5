"""A worker frozen for failed verifications is paid nothing on chain until an operator clears it, however the
freeze and the payout run interleave. The teardown checks the books against the chain (tests/support)."""

from __future__ import annotations

from typing import Any

import pytest

from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.payments.base import SignedPayout
from tests.support.payouts import THRESHOLD, Env

pytestmark = [pytest.mark.postgres, pytest.mark.chain]

AMOUNT = 2 * THRESHOLD


def _freeze(env: Env, worker_id: str, reason: str = "failed verification 3 times") -> None:
    with session_scope(env.engine) as s:
        service.freeze_worker(s, worker_id=worker_id, reason=reason)


def _unfreeze(env: Env, worker_id: str) -> None:
    with session_scope(env.engine) as s:
        service.unfreeze_worker(s, worker_id=worker_id)


def test_a_frozen_worker_gets_no_transfer_until_cleared(env: Env) -> None:
    frozen = env.earn("w-frozen", AMOUNT)
    honest = env.earn("w-honest", AMOUNT)
    _freeze(env, "w-frozen")
    report = env.runner().pay_due()
    assert (report.created, report.broadcast, report.errors) == (1, 1, [])
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(honest) == AMOUNT
    assert env.w3.eth.get_balance(frozen) == 0 and env.transfers_to(frozen) == []
    assert env.worker_balance("w-frozen") == AMOUNT  # kept, not taken

    _unfreeze(env, "w-frozen")
    assert env.runner().pay_due().created == 1
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(frozen) == AMOUNT and len(env.transfers_to(frozen)) == 1


def test_a_payout_left_unsigned_is_reversed_by_the_freeze_and_never_sent(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.fail_methods = {"eth_getBlockByNumber"}  # fee estimation fails after create_payout
    env.runner().pay_due()
    assert [p[2:] for p in env.payouts()] == [("pending", None)]  # debited, never signed
    env.chain.fail_methods = set()
    _freeze(env, "w1")
    assert [p[2] for p in env.payouts()] == ["reversed"]
    assert env.worker_balance("w1") == AMOUNT
    report = env.runner().pay_due()
    assert (report.created, report.broadcast) == (0, 0)
    assert env.transfers_to(wallet) == []


def test_a_freeze_between_debit_and_signing_sends_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    wallet = env.earn("w1", AMOUNT)
    sign = env.provider.sign_payout

    def freeze_then_sign(**kwargs: Any) -> SignedPayout:
        _freeze(env, "w1")  # lands after create_payout committed, before the signed tx is recorded
        return sign(**kwargs)

    monkeypatch.setattr(env.provider, "sign_payout", freeze_then_sign)
    report = env.runner().pay_due()
    assert report.created == 1 and report.broadcast == 0
    assert report.errors and "reversed" in report.errors[0]
    monkeypatch.undo()
    assert [p[2:] for p in env.payouts()] == [("reversed", None)]
    assert env.worker_balance("w1") == AMOUNT
    assert env.runner().pay_due().created == 0
    assert env.transfers_to(wallet) == []
