"""``azu up``'s state across runs: the local user's API key and faucet credit are made once per ledger (not
per run), kept in the state dir with mode 0600; ``--fresh`` deletes the ledger and everything bound to it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from azu.billing import accounts
from azu.billing.ledger import service
from azu.billing.ledger.db import session_scope
from azu.cli import up
from tests.support.database import BOOKS_CHECK, LEDGER_TABLES

pytestmark = pytest.mark.postgres


@pytest.fixture
def ledger(engine: Engine):
    yield engine.url.render_as_string(hide_password=False)
    with session_scope(engine) as s:
        row = s.execute(text(BOOKS_CHECK)).one()
        s.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
    assert row.total == 0 and row.drifted == 0 and row.unbalanced == 0 and row.negative == 0, row


def _balance(engine: Engine) -> int:
    with session_scope(engine) as s:
        return service.user_balance(s, up.LOCAL_USER_ADDRESS)


def _keys(engine: Engine) -> int:
    with session_scope(engine) as s:
        return len(accounts.list_api_keys(s, up.LOCAL_USER_ADDRESS))


def test_every_run_reuses_the_key_and_the_faucet_credits_once(ledger, engine, tmp_path):
    state = tmp_path / "local-user.json"
    first = up.local_user_key(ledger, state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text()) == {"address": up.LOCAL_USER_ADDRESS, "api_key": first}
    for _ in range(3):  # three more runs of azu up
        assert up.local_user_key(ledger, state) == first
    assert _balance(engine) == up.FAUCET_AMOUNT
    assert _keys(engine) == 1
    with session_scope(engine) as s:
        assert accounts.user_for_key_hash(s, accounts.hash_api_key(first)) == up.LOCAL_USER_ADDRESS


def test_a_key_the_ledger_does_not_know_is_replaced_but_the_faucet_stays_single(ledger, engine, tmp_path):
    state = tmp_path / "local-user.json"
    first = up.local_user_key(ledger, state)
    state.write_text(json.dumps({"address": up.LOCAL_USER_ADDRESS, "api_key": "azu-not-in-this-ledger"}))
    second = up.local_user_key(ledger, state)
    assert second not in (first, "azu-not-in-this-ledger")
    assert json.loads(state.read_text())["api_key"] == second
    state.unlink()  # a lost file: a new key, still no second credit
    third = up.local_user_key(ledger, state)
    assert third != second
    assert _balance(engine) == up.FAUCET_AMOUNT
    assert _keys(engine) == 3


def _state_dir(root: Path) -> list[str]:
    for name in ("models/azu-demo", "registry/azu-demo", "cache/local-0", "redis", "pgdata/base", "keys",
                 "logs"):
        (root / name).mkdir(parents=True)
    for name in ("core.key", "chain.json", "local-user.json", "keys.json", "keys/local-0.key", "logs/api.log",
                 "pgdata/PG_VERSION"):
        (root / name).write_text("x")
    return sorted(os.listdir(root))


def test_fresh_deletes_the_ledger_and_what_is_bound_to_it_but_keeps_logs(tmp_path):
    _state_dir(tmp_path)
    deleted = up.forget_state(tmp_path, keep_ledger_bound=False)
    assert sorted(deleted) == sorted(up.FRESH_ALWAYS + up.FRESH_WITH_LEDGER)
    assert sorted(os.listdir(tmp_path)) == ["logs"]
    assert (tmp_path / "logs" / "api.log").read_text() == "x"


def test_fresh_with_an_external_ledger_keeps_the_keys_bound_in_it(tmp_path):
    _state_dir(tmp_path)
    up.forget_state(tmp_path, keep_ledger_bound=True)
    assert sorted(os.listdir(tmp_path)) == ["keys", "keys.json", "local-user.json", "logs", "pgdata"]
    assert (tmp_path / "keys" / "local-0.key").is_file()


def test_fresh_refuses_while_a_postgres_still_runs_on_pgdata(tmp_path):
    _state_dir(tmp_path)
    (tmp_path / "pgdata" / "postmaster.pid").write_text(f"{os.getpid()}\n/some/dir\n")  # a live pid
    with pytest.raises(up.StartupFailed, match="still runs"):
        up.forget_state(tmp_path, keep_ledger_bound=False)
    assert (tmp_path / "pgdata" / "PG_VERSION").is_file() and (tmp_path / "keys").is_dir()
