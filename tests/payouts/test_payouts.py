"""Exactly-once payouts on the real PostgreSQL ledger and a real EVM, with faults injected at the RPC."""

from __future__ import annotations

import threading

import pytest
from eth_account import Account
from sqlalchemy import text

from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.payments.payouts import PayoutRunner, RunReport
from tests.support.chain import Crash, deploy_reverting_contract
from tests.support.payouts import THRESHOLD, Env

pytestmark = [pytest.mark.postgres, pytest.mark.chain]

AMOUNT = 2 * THRESHOLD


def test_worker_over_threshold_gets_exactly_one_transfer(env: Env) -> None:
    rich = env.earn("worker-rich", AMOUNT)
    poor = env.earn("worker-poor", THRESHOLD // 2)
    report = env.runner().pay_due()
    assert (report.created, report.broadcast, report.errors) == (1, 1, [])
    assert env.w3.eth.get_balance(rich) == AMOUNT and env.w3.eth.get_balance(poor) == 0
    assert env.worker_balance("worker-rich") == 0 and env.worker_balance("worker-poor") == THRESHOLD // 2
    assert [p[:3] for p in env.payouts()] == [("worker-rich", AMOUNT, "sent")]

    assert env.runner().confirm_sent().confirmed == 1
    sent_txs = env.scheduler_txs()
    again = env.runner().pay_due()  # nothing due any more: no second transfer
    assert (again.created, env.scheduler_txs()) == (0, sent_txs)
    assert [p[2] for p in env.payouts()] == ["confirmed"]
    assert env.transfers_to(rich) == [env.payouts()[0][3]]


def test_rpc_down_sends_nothing_and_loses_nothing(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.down = True
    report = env.runner().pay_due()
    assert report.created == 0 and report.errors  # the node must answer before any worker is debited
    assert env.payouts() == [] and env.worker_balance("w1") == AMOUNT
    env.chain.down = False
    env.runner().pay_due()
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_rpc_fails_after_the_debit_then_pays_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.fail_methods = {"eth_getBlockByNumber"}  # fee estimation fails after create_payout
    report = env.runner().pay_due()
    assert report.created == 1 and report.errors
    assert [p[2:] for p in env.payouts()] == [("pending", None)]  # debited, never signed
    assert env.worker_balance("w1") == 0
    env.chain.fail_methods = set()
    report = env.runner().pay_due()
    assert (report.created, report.broadcast) == (0, 1)  # the existing payout, signed now
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_answer_lost_after_sending_never_pays_twice(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.lose_send_answers = 1
    env.chain.down_after_send = True  # and the node stays unreachable: the run cannot tell what happened
    report = env.runner().pay_due()
    assert report.errors and report.broadcast == 0
    env.chain.down = False
    assert env.w3.eth.get_balance(wallet) == AMOUNT  # it did go out
    [(_, _, status, tx_id)] = env.payouts()
    assert status == "pending" and tx_id is not None  # recorded before the broadcast
    for _ in range(2):
        env.runner().pay_due()
        env.runner().confirm_sent()
    assert env.transfers_to(wallet) == [tx_id]
    assert [p[2] for p in env.payouts()] == ["confirmed"]


def test_crash_between_sending_and_recording_is_reconciled(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.crash_after_send = 1
    with pytest.raises(Crash):
        env.runner().pay_due()
    [(_, _, status, tx_id)] = env.payouts()
    assert status == "pending" and tx_id is not None
    restarted = env.runner()  # a new process: nothing of the crashed run in memory
    report = restarted.pay_due()
    assert (report.confirmed, report.created, report.broadcast) == (1, 0, 0)
    assert env.transfers_to(wallet) == [tx_id]


def test_send_that_never_reached_the_chain_is_resent_as_the_same_bytes(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.refuse_sends = 1
    runner = env.runner()
    report = runner.pay_due()
    assert report.errors and env.w3.eth.get_balance(wallet) == 0
    [(_, _, _, tx_id)] = env.payouts()
    nonce_before = env.scheduler_txs()
    report = runner.confirm_sent()  # same process: it still has the signed bytes
    assert report.resent == 1 and report.fillers == 0
    assert env.transfers_to(wallet) == [tx_id]  # the very transaction that was recorded
    assert env.scheduler_txs() == nonce_before + 1
    runner.confirm_sent()
    assert [p[2] for p in env.payouts()] == ["confirmed"]


def test_send_lost_then_restart_still_pays_exactly_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.refuse_sends = 1
    env.runner().pay_due()
    # A restarted process resolves it from the ledger alone: it re-sends the stored bytes, or (when the
    # ledger does not keep them) takes the nonce with a zero-value transfer and pays again once it is sure.
    for _ in range(3):
        env.runner().pay_due()
        env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1
    assert env.worker_balance("w1") == 0
    assert env.payouts()[-1][2] == "confirmed"


def test_nonce_taken_by_another_transaction_is_reversed_then_paid_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.refuse_sends = 1
    env.runner().pay_due()
    [(_, _, _, lost_tx)] = env.payouts()
    nonce = env.provider.next_nonce()  # the lost payout's nonce: it never reached the chain
    # Someone else (an operator, another tool with the same key) uses that nonce first.
    env.provider.broadcast(env.provider.sign_filler(nonce=nonce))
    report = env.runner().pay_due()
    assert report.reversed == 1 and report.created == 1 and report.broadcast == 1
    env.runner().confirm_sent()
    statuses = [(p[2], p[3]) for p in env.payouts()]
    assert statuses[0] == ("reversed", lost_tx) and statuses[1][0] == "confirmed"
    assert env.transfers_to(wallet) == [statuses[1][1]]
    assert env.w3.eth.get_balance(wallet) == AMOUNT


def test_nonce_gap_is_filled_and_the_payout_lands_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    start = env.scheduler_txs()
    env.chain.pending_nonce_skew = 2  # the node over-reports the pending nonce: the payout is signed at +2
    env.runner().pay_due()
    env.chain.pending_nonce_skew = 0
    assert env.w3.eth.get_balance(wallet) == 0  # refused: nonces start+0 and start+1 are empty
    for _ in range(2):
        env.runner().pay_due()
        env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1
    assert env.scheduler_txs() >= start + 3  # the gap was filled by zero-value self-transfers
    assert env.payouts()[-1][2] == "confirmed"


def test_payout_refused_before_signing_is_reversed(env: Env) -> None:
    contract = deploy_reverting_contract(env.w3)
    env.earn("w1", AMOUNT, wallet=contract)
    report = env.runner().pay_due()
    assert report.reversed == 1 and report.broadcast == 0
    assert env.worker_balance("w1") == AMOUNT  # given back
    assert [p[2] for p in env.payouts()] == ["reversed"]
    env.wallets.pop("w1")  # a contract holding nothing: nothing to compare on chain
    with session_scope(env.engine) as s:  # let the teardown's books check see a clean worker
        service.set_worker_wallet(s, "w1", Account.create().address)
    env.runner().pay_due()
    env.runner().confirm_sent()


def test_crash_after_create_before_sign_pays_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    with session_scope(env.engine) as s:  # what a run that died right after create_payout leaves
        service.create_payout(s, worker_id="w1", amount=AMOUNT, to_address=wallet)
    report = env.runner().pay_due()
    assert (report.created, report.broadcast) == (0, 1)
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_two_overlapping_runs_pay_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    second: list[RunReport] = []

    def run_second_while_first_is_sending() -> None:
        env.chain.before_send = None
        thread = threading.Thread(target=lambda: second.append(env.runner().pay_due()))
        thread.start()
        thread.join(timeout=30)

    env.chain.before_send = run_second_while_first_is_sending
    first = env.runner().pay_due()
    assert second and second[0].skipped and not first.skipped
    assert first.broadcast == 1
    env.runner().confirm_sent()
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_concurrent_runs_started_together_pay_once(env: Env) -> None:
    wallets = [env.earn(f"w{i}", AMOUNT) for i in range(3)]
    runners = [env.runner() for _ in range(4)]
    barrier = threading.Barrier(len(runners))
    reports: list[RunReport] = []
    lock = threading.Lock()

    def go(r: PayoutRunner) -> None:
        barrier.wait(timeout=30)
        result = r.pay_due()
        with lock:
            reports.append(result)

    threads = [threading.Thread(target=go, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(reports) == len(runners)
    assert sum(r.created for r in reports) == 3
    env.runner().confirm_sent()
    for wallet in wallets:
        assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_payout_without_stored_bytes_takes_its_nonce_then_pays_once(env: Env) -> None:
    wallet = env.earn("w1", AMOUNT)
    env.chain.refuse_sends = 1
    env.runner().pay_due()
    with session_scope(env.engine) as s:  # a row whose signed bytes are missing
        s.execute(text("UPDATE payouts SET raw_tx = NULL"))
    report = env.runner().confirm_sent()
    assert report.fillers == 1 and report.resent == 0  # a zero-value transfer took the nonce
    report = env.runner().pay_due()
    assert report.reversed == 1 and report.broadcast == 1  # provably dead -> reversed -> paid anew
    env.runner().confirm_sent()
    assert [p[2] for p in env.payouts()] == ["reversed", "confirmed"]
    assert env.w3.eth.get_balance(wallet) == AMOUNT and len(env.transfers_to(wallet)) == 1


def test_beat_tasks_are_registered_and_run_the_runner(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.payouts as tasks
    from workers import app

    assert {"workers.payouts.pay_due", "workers.payouts.confirm_sent"} <= set(app.tasks)
    schedule = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert {"workers.payouts.pay_due", "workers.payouts.confirm_sent"} <= schedule
    # The task body, run in-process: the EVM lives in this process, so a worker process could not reach it.
    monkeypatch.setattr(tasks, "runner", env.runner)
    wallet = env.earn("w1", AMOUNT)
    assert tasks.pay_due.run()["broadcast"] == 1
    assert tasks.confirm_sent.run()["confirmed"] == 1
    assert env.w3.eth.get_balance(wallet) == AMOUNT


# Runtime: revert when the block number is odd (NUMBER 1 AND JUMPI -> REVERT), else accept the value.
ODD_BLOCK_REVERTER_INIT = "0x600e600c600039600e6000f3" + "43600116600857005b60006000fd"


def test_payout_reverted_on_chain_is_reversed_then_paid_once(env: Env) -> None:
    deploy = env.w3.eth.send_transaction({"from": env.w3.eth.accounts[0], "data": ODD_BLOCK_REVERTER_INIT,
                                          "gas": 200_000})
    wallet = str(env.w3.eth.get_transaction_receipt(deploy)["contractAddress"])
    env.earn("w1", AMOUNT, wallet=wallet)
    tester = env.chain.ethereum_tester
    if (env.w3.eth.block_number + 1) % 2:  # gas is estimated against an even (accepting) pending block
        tester.mine_blocks(1)

    def mine_one_first() -> None:  # ... and a block lands before ours: it executes in an odd block
        env.chain.before_send = None
        tester.mine_blocks(1)

    env.chain.before_send = mine_one_first
    env.runner().pay_due()
    [(_, _, _, reverted_tx)] = env.payouts()
    assert env.w3.eth.get_transaction_receipt(reverted_tx)["status"] == 0  # type: ignore[arg-type]
    assert env.w3.eth.get_balance(wallet) == 0
    report = env.runner().pay_due()  # reverted -> reversed to the worker -> paid by a new payout
    assert report.reversed == 1 and report.created == 1 and report.broadcast == 1
    env.runner().confirm_sent()
    assert [p[2] for p in env.payouts()] == ["reversed", "confirmed"]
    assert env.w3.eth.get_balance(wallet) == AMOUNT
