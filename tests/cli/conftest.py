"""CLI fixtures: the real API (Flask app served over HTTP on loopback) with the real ledger on PostgreSQL
(a fresh, migrated database per run), its own throwaway Redis, and the dev chain over JSON-RPC: what
``azu up`` runs, minus the workers.

After every test: all ledger accounts sum to zero, every balance equals its entries, no journal transaction
is unbalanced; then the tables are emptied.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text
from werkzeug.serving import make_server

from azu.billing.ledger.db import session_scope
from azu.payments.devchain import start_devchain
from azu.payments.hyperliquid import HyperliquidProvider
from tests.cli.support import WORKERS, Network
from tests.support.database import BOOKS_CHECK, LEDGER_TABLES, migrated_engine
from tests.support.redis_server import private_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of our own (the API's rate limits count there), gone after the run."""
    with private_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    with migrated_engine("azu_cli") as eng:
        yield eng


@pytest.fixture
def network(engine: Engine, redis_url: str, tmp_path: Path) -> Iterator[Network]:
    from web import create_app

    redis.Redis.from_url(redis_url).flushdb()  # rate-limit counters of earlier tests
    chain = start_devchain()
    env = chain.env()
    provider = HyperliquidProvider(rpc_url=env["HYPERLIQUID_RPC_URL"],
                                   private_key=env["SCHEDULER_PRIVATE_KEY"],
                                   platform_address=env["HYPERLIQUID_ADDRESS"],
                                   chain_id=int(env["HYPERLIQUID_CHAIN_ID"]), min_confirmations=1)
    app = create_app({"REDIS_URL": redis_url, "AZU_LEDGER_ENGINE": engine, "AZU_PAYMENT_PROVIDER": provider})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_port}"
    state_dir = tmp_path / ".azu"
    state_dir.mkdir()
    # What `azu up` writes (the "chain" block is the dev chain's own description of itself).
    (state_dir / "local.json").write_text(json.dumps({"base_url": base_url,
                                                      "chain": chain.info(worker_ids=WORKERS)}))
    try:
        yield Network(base_url, chain, provider, engine, state_dir)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        chain.stop()
        with session_scope(engine) as s:
            row = s.execute(text(BOOKS_CHECK)).one()
        with session_scope(engine) as s:
            s.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
        assert row.total == 0, f"accounts sum to {row.total}, not 0"
        assert row.drifted == 0 and row.unbalanced == 0 and row.negative == 0, row
