"""``azu key / deposit / balance / payouts`` against the real API, ledger and dev chain
(tests/cli/conftest.py)."""

from __future__ import annotations

import queue
import re
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest
from eth_account import Account
from web3 import Web3

from azu.billing.ledger import service
from azu.billing.ledger.db import session_factory, session_scope
from azu.cli import main
from azu.payments.devchain import worker_wallet
from azu.payments.payouts import PayoutRunner
from tests.cli.support import WORKERS, Network

pytestmark = [pytest.mark.postgres, pytest.mark.chain]

HYPE = 10**18


def azu(net: Network, *argv: str) -> int:
    return main([argv[0], "--state-dir", str(net.state_dir), *argv[1:]])


def _w3(net: Network) -> Web3:
    return Web3(Web3.HTTPProvider(net.chain.url))


def _earn(net: Network, worker_id: str, amount: int) -> None:
    """``worker_id`` earns ``amount`` through the ledger's real path: a user's credited deposit (made with
    ``azu deposit``) is held for a job and settled with the worker's usage, the worker's wallet on file."""
    user = net.chain.accounts[0].address
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    charge = amount * 5 // 4  # the worker's 80 %
    with session_scope(net.engine) as s:
        service.set_worker_wallet(s, worker_id, worker_wallet(WORKERS.index(worker_id)).address)
        service.place_hold(s, job_id=job_id, user_address=user, amount=charge, price=charge)
        service.settle_hold(s, job_id=job_id, usage={worker_id: 1})


def test_get_a_key_deposit_and_see_the_balance_move(network: Network,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    user = network.chain.accounts[0]
    w3 = _w3(network)
    platform_before = w3.eth.get_balance(network.chain.platform.address)  # type: ignore[arg-type]

    assert azu(network, "key") == 0
    out = capsys.readouterr().out
    key = re.search(r"API key\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    assert user.address in out
    keys_file = network.state_dir / "keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600 and key in keys_file.read_text()

    assert azu(network, "balance") == 0
    assert "balance  0 HYPE (0 wei)" in capsys.readouterr().out

    assert azu(network, "deposit", "1.5") == 0
    out = capsys.readouterr().out
    assert "credited 1.5 HYPE to " + user.address in out and "balance  1.5 HYPE" in out
    assert w3.eth.get_balance(network.chain.platform.address) == platform_before + 3 * HYPE // 2  # type: ignore[arg-type]

    assert azu(network, "deposit", "250", "--wei") == 0
    capsys.readouterr()
    assert azu(network, "balance", "--api-key", key) == 0
    assert f"({3 * HYPE // 2 + 250} wei)" in capsys.readouterr().out


def test_the_key_is_bound_to_its_own_account(network: Network, capsys: pytest.CaptureFixture[str]) -> None:
    """Account 1's key sees account 1's balance, not account 0's deposit."""
    assert azu(network, "key") == 0
    assert azu(network, "deposit", "2") == 0
    assert azu(network, "key", "--account", "1") == 0
    capsys.readouterr()
    assert azu(network, "balance", "--account", "1") == 0
    out = capsys.readouterr().out
    assert network.chain.accounts[1].address in out and "balance  0 HYPE" in out


def test_refusals_change_nothing(network: Network, capsys: pytest.CaptureFixture[str]) -> None:
    w3 = _w3(network)
    broke = Account.create()
    # Not enough on chain: refused before anything is signed or sent.
    assert azu(network, "deposit", "1", "--private-key", broke.key.to_0x_hex()) == 1
    err = capsys.readouterr().err
    assert "not enough" in err and broke.key.to_0x_hex()[2:] not in err
    assert w3.eth.get_transaction_count(broke.address) == 0
    height = w3.eth.block_number
    for bad in ("0", "-1", "abc", "1e-30"):
        assert azu(network, "deposit", bad) == 1
        assert "AMOUNT" in capsys.readouterr().err
    assert azu(network, "deposit", "1", "--private-key", "0x1234") == 1
    assert "malformed" in capsys.readouterr().err
    assert w3.eth.block_number == height  # no transaction went out
    # No key yet: a hint, not a traceback.
    assert azu(network, "balance", "--account", "2") == 1
    assert "run `azu key` first" in capsys.readouterr().err
    assert azu(network, "balance", "--api-key", "azu-not-a-key") == 1
    assert "401" in capsys.readouterr().err
    with session_scope(network.engine) as s:
        assert service.user_balance(s, network.chain.accounts[0].address) == 0


def test_api_down_is_one_line(network: Network, capsys: pytest.CaptureFixture[str]) -> None:
    assert azu(network, "key", "--base-url", "http://127.0.0.1:9") == 1
    err = capsys.readouterr().err
    assert "is `azu up` running?" in err and "Traceback" not in err


def test_a_worker_gets_paid_on_chain(network: Network, capsys: pytest.CaptureFixture[str]) -> None:
    assert azu(network, "deposit", "1") == 0
    capsys.readouterr()
    assert azu(network, "payouts") == 0
    assert "no payouts yet" in capsys.readouterr().out
    _earn(network, "local-0", 4 * 10**15)
    report = PayoutRunner(session_factory(network.engine), network.provider, threshold=10**15).pay_due()
    assert not report.errors
    wallet = worker_wallet(0).address
    assert _w3(network).eth.get_balance(wallet) == 4 * 10**15  # type: ignore[arg-type]
    assert azu(network, "payouts") == 0
    out = capsys.readouterr().out
    assert re.search(r"paid 0\.004 HYPE to local-0 in block \d+: 0x[0-9a-f]{64}", out)
    assert f"local-0 ({wallet}): 0.004 HYPE on chain" in out
    assert "to local-1" not in out


def test_watch_shows_a_payout_as_it_lands(network: Network) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "azu.cli", "payouts", "--state-dir", str(network.state_dir), "--watch",
         "--interval", "0.2", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()

    def wait_for(pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s") from None
            if re.search(pattern, line):
                return line

    try:
        wait_for(r"^watching")
        assert azu(network, "deposit", "1") == 0
        _earn(network, "local-1", 2 * 10**15)
        PayoutRunner(session_factory(network.engine), network.provider, threshold=10**15).pay_due()
        assert "0.002 HYPE to local-1" in wait_for(r"paid .* to local-1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command, default in (("key", "default 0"), ("deposit", "default 60"), ("payouts", "default 2")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert default in capsys.readouterr().out
