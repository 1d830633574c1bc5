"""``azu verdicts`` / ``azu unban``: an operator reads why a worker is banned and clears it (real Redis; the
ledger side of ``unban`` is LedgerBilling.unfreeze_worker, tested in tests/ledger/test_verdicts.py)."""

from __future__ import annotations

from pathlib import Path

import redis

from azu.cli import main
from azu.network import directory, keys
from tests.support.redis_server import private_redis


def test_verdicts_show_the_ban_and_unban_clears_it(tmp_path: Path, monkeypatch, capsys) -> None:
    with private_redis(tmp_path) as url:
        monkeypatch.setenv("REDIS_URL", url)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        r = redis.Redis.from_url(url)
        r.hset(keys.BANNED, "w-bad", "2 failed checks, the last on job j1: hop 1 (w-bad): ...")
        r.sadd(keys.VERIFY_SUSPECT, "w-bad", "w-odd")
        r.set(keys.verify_strikes("w-bad"), 2)
        assert main(["verdicts"]) == 0
        out = capsys.readouterr().out
        assert "banned  w-bad: 2 failed checks" in out and "suspect w-odd" in out
        assert main(["unban", "w-bad"]) == 0
        assert not r.hexists(keys.BANNED, "w-bad") and not r.sismember(keys.VERIFY_SUSPECT, "w-bad")
        assert r.get(keys.verify_strikes("w-bad")) is None
        assert "w-bad" not in {keys.as_str(w) for w in r.hkeys(keys.BANNED)}
        assert directory.LOST != keys.BANNED
