"""CLI fixtures: the real API (Flask app served over HTTP on loopback) with the real ledger on PostgreSQL
(a fresh, migrated database per run), its own throwaway Redis, and the dev chain over JSON-RPC: what
``azu up`` runs, minus the workers.

After every test: all ledger accounts sum to zero, every balance equals its entries, no journal transaction
is unbalanced; then the tables are emptied.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text
from werkzeug.serving import make_server

from azu.billing.ledger.db import make_engine, migrate, session_scope
from azu.payments.devchain import start_devchain
from azu.payments.hyperliquid import HyperliquidProvider
from tests.cli.support import WORKERS, Network
from tests.support.database import BOOKS_CHECK, LEDGER_TABLES, create_database, drop_database


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of our own (the API's rate limits count there), gone after the run."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.ping():
                break
        except redis.RedisError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    url = create_database("azu_cli")
    eng = make_engine(url, pool_size=5, max_overflow=5)
    try:
        migrate(url)
        yield eng
    finally:
        eng.dispose()
        drop_database(url)


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
