"""A core without a payment provider: payout ticks say so once, in one line (no traceback every tick)."""

from __future__ import annotations

import logging


def test_payout_ticks_without_a_provider_log_one_line(monkeypatch, caplog):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    for name in ("HYPERLIQUID_RPC_URL", "HYPERLIQUID_ADDRESS", "SCHEDULER_PRIVATE_KEY", "PAYMENT_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    from workers import payouts
    payouts.runner.cache_clear()
    payouts._said_unavailable.clear()
    with caplog.at_level(logging.WARNING, logger="workers.payouts"):
        for _ in range(3):
            assert payouts.pay_due.run() == {"skipped": "payouts are not configured"}
            assert payouts.confirm_sent.run() == {"skipped": "payouts are not configured"}
    lines = [r for r in caplog.records if r.name == "workers.payouts"]
    assert len(lines) == 1 and "payouts are off" in lines[0].getMessage() and not lines[0].exc_info
