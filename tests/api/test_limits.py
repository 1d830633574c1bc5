"""The API's edge for real: rate limits counted in a real Redis (Flask-Limiter), CORS (flask-cors), and the
bounded sign-in challenges against the real PostgreSQL ledger.

Every refusal is a 429 with ``Retry-After`` in the one error shape, and a refused request changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from eth_account import Account
from sqlalchemy import func, select, update
from web3 import EthereumTesterProvider, Web3

from azu.billing.base import FreeBilling
from azu.errors import Unauthorized
from tests.support.api import MODEL_ID

OK_SUBMIT = {"model_id": MODEL_ID, "prompt": "hello", "max_tokens": 4}


class NoKeys(FreeBilling):
    def authenticate(self, api_key):
        raise Unauthorized("unknown or revoked API key")


def _app(redis_url: str, billing=None):
    from web import create_app

    return create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": billing or FreeBilling()})


def _error(resp) -> dict:
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_a_burst_of_wrong_keys_is_cut_off_by_the_per_address_limit(monkeypatch, redis_url, registry_dir, r):
    r.flushdb()
    monkeypatch.setenv("AZU_RATE_LIMIT_JOBS", "20/minute")
    client = _app(redis_url, NoKeys()).test_client()
    codes = []
    for i in range(200):
        resp = client.post("/submit", json=OK_SUBMIT, headers={"Authorization": f"Bearer wrong-{i}"})
        codes.append(resp.status_code)
        if resp.status_code == 429:
            err = _error(resp)
            assert err["type"] == "rate_limit_error" and "rate limit" in err["message"]
            assert 1 <= int(resp.headers["Retry-After"]) <= 61
    assert Counter(codes) == Counter({401: 20, 429: 180})
    assert codes[:20] == [401] * 20  # the limit counts every request, refused or not, in order
    assert not r.keys("azu:job:*")  # nothing was enqueued
    counters = [k.decode() for k in r.keys("LIMITS:LIMITER/azu:ratelimit/*")]
    assert counters  # counted in the app's own Redis
    assert not [k for k in counters if "wrong-" in k]  # by a hash of the key, never the key itself


def test_one_key_is_limited_across_addresses(monkeypatch, redis_url, registry_dir, r):
    r.flushdb()
    monkeypatch.setenv("AZU_RATE_LIMIT_JOBS", "5/minute")
    client = _app(redis_url).test_client()
    codes = [client.post("/v1/chat/completions", json={"model": "nobody/x", "messages": []},
                         headers={"Authorization": "Bearer same-key"},
                         environ_base={"REMOTE_ADDR": f"10.0.0.{i}"}).status_code for i in range(8)]
    assert codes == [400] * 5 + [429] * 3
    # Another key from a fresh address is not affected.
    other = client.post("/v1/chat/completions", json={"model": "nobody/x", "messages": []},
                        headers={"Authorization": "Bearer other-key"},
                        environ_base={"REMOTE_ADDR": "10.0.1.1"})
    assert other.status_code == 400


def test_limits_can_be_turned_off_and_reads_are_not_limited(monkeypatch, redis_url, registry_dir, r):
    r.flushdb()
    monkeypatch.setenv("AZU_RATE_LIMIT_JOBS", "off")
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "2/minute")
    client = _app(redis_url).test_client()
    assert {client.post("/submit", json={}).status_code for _ in range(30)} == {400}
    assert {client.get("/healthz").status_code for _ in range(30)} == {200}
    shard = [client.post("/models/shard", json={}).status_code for _ in range(4)]
    assert shard == [400, 400, 429, 429]


def test_bad_limit_setting_is_refused(monkeypatch):
    from azu.config import SettingsError, get_settings

    monkeypatch.setenv("AZU_RATE_LIMIT_JOBS", "lots")
    with pytest.raises(SettingsError, match="AZU_RATE_LIMIT_JOBS"):
        get_settings()


# --- CORS --------------------------------------------------------------------------------------------------
def test_cors_is_off_by_default(redis_url, registry_dir, r):
    client = _app(redis_url).test_client()
    resp = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_cors_allows_only_the_configured_origins(monkeypatch, redis_url, registry_dir, r):
    monkeypatch.setenv("AZU_CORS_ORIGINS", "https://app.example, https://other.example")
    client = _app(redis_url).test_client()
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    resp = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    evil = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers


# --- sign-in challenges stay bounded (PostgreSQL) ----------------------------------------------------------
@pytest.fixture
def ledger_app(monkeypatch, redis_url, r) -> Iterator:
    from azu.billing.ledger.db import make_engine, migrate
    from azu.payments.hyperliquid import HyperliquidProvider
    from tests.support.database import create_database, drop_database
    from web import create_app

    r.flushdb()
    url = create_database("azu_test_limits")
    engine = make_engine(url)
    try:
        migrate(url)
        provider = HyperliquidProvider(web3=Web3(EthereumTesterProvider()),
                                       private_key=Account.create().key.to_0x_hex())

        def make():  # after the test has set its environment: create_app reads the settings
            return create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_LEDGER_ENGINE": engine,
                               "AZU_PAYMENT_PROVIDER": provider}), engine

        yield make
    finally:
        engine.dispose()
        drop_database(url)


@pytest.mark.postgres
@pytest.mark.chain
def test_challenges_are_capped_per_address_and_expired_ones_deleted(monkeypatch, ledger_app):
    from azu.billing.ledger.db import session_scope
    from azu.billing.ledger.models import AuthChallenge

    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "off")
    monkeypatch.setenv("AZU_MAX_OPEN_CHALLENGES", "3")
    app, engine = ledger_app()
    client = app.test_client()
    address = Account.create().address

    def rows() -> int:
        with session_scope(engine) as s:
            return s.execute(select(func.count()).select_from(AuthChallenge)).scalar_one()

    codes = [client.post("/auth/challenge", json={"address": address}).status_code for _ in range(3)]
    assert codes == [201] * 3
    refused = client.post("/auth/challenge", json={"address": address})
    assert refused.status_code == 429 and _error(refused)["param"] == "address"
    assert 1 <= int(refused.headers["Retry-After"]) <= 301
    assert rows() == 3  # the refused request stored nothing
    # Once they expire they are deleted, and the address may ask again.
    with session_scope(engine) as s:
        s.execute(update(AuthChallenge).values(expires_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 1)))
    assert client.post("/auth/challenge", json={"address": address}).status_code == 201
    assert rows() == 1


@pytest.mark.postgres
@pytest.mark.chain
def test_challenge_requests_are_rate_limited_per_client_address(monkeypatch, ledger_app):
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "10/minute")
    app, _ = ledger_app()
    client = app.test_client()
    codes = Counter(client.post("/auth/challenge", json={"address": Account.create().address}).status_code
                    for _ in range(40))
    assert codes == Counter({201: 10, 429: 30})
