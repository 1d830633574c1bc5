"""Attack 7 of the open network, for real: a model is sharded only on a request the core authorized.

The hub is the local stand-in (tests/support/fake_hub.py, a real HTTP server): its request log shows what
was listed and what was downloaded. Each refused request is checked to have changed nothing: no model state,
no task on the ``registry`` queue, no download.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from sqlalchemy import Engine

from azu.billing.base import FreeBilling
from tests.support.api import MODEL_ID
from tests.support.fake_hub import FakeHub

REGISTRY_QUEUE = "registry"


@pytest.fixture
def hub(demo_src: Path, monkeypatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    for i in range(4):
        fake.add_folder(f"org/model-{i}", demo_src)
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.stop()


def _weights_bytes(demo_src: Path) -> int:
    return sum(p.stat().st_size for p in demo_src.glob("*.safetensors"))


def _client(redis_url: str, billing=None):
    from web import create_app

    app = create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": billing or FreeBilling(),
                      "RATELIMIT_ENABLED": False})
    return app.test_client()


def _nothing_started(r, hub: FakeHub, model_id: str) -> None:
    assert not r.exists(f"azu:model:{model_id}")
    assert r.llen(REGISTRY_QUEUE) == 0
    assert hub.resolved() == []  # not one file was downloaded (or probed)


def test_a_model_over_the_size_cap_is_refused_from_the_listing_alone(monkeypatch, redis_url, registry_dir, r,
                                                                     hub, demo_src):
    r.flushdb()
    size = _weights_bytes(demo_src)
    monkeypatch.setenv("AZU_MAX_SHARD_BYTES", str(size - 1))
    resp = _client(redis_url).post("/models/shard", json={"model_id": "org/model-0"})
    assert resp.status_code == 403, resp.get_json()
    err = resp.get_json()["error"]
    assert err["param"] == "model_id" and str(size) in err["message"]
    assert "AZU_MAX_SHARD_BYTES" in err["message"]
    assert [q.path for q in hub.requests] == ["/api/models/org/model-0"]  # one listing, nothing else
    _nothing_started(r, hub, "org/model-0")


def test_a_model_under_the_cap_is_queued_once(monkeypatch, redis_url, registry_dir, r, hub, demo_src):
    r.flushdb()
    monkeypatch.setenv("AZU_MAX_SHARD_BYTES", str(_weights_bytes(demo_src)))
    client = _client(redis_url)
    first = client.post("/models/shard", json={"model_id": "org/model-1"})
    assert first.status_code == 202 and first.get_json()["state"] == "pending"
    again = client.post("/models/shard", json={"model_id": "org/model-1"})
    assert again.status_code == 202
    assert r.llen(REGISTRY_QUEUE) == 1  # one task however often it is asked
    assert hub.resolved() == []  # the API only listed the repo; the registry task downloads


def test_an_unknown_hub_model_is_404_and_starts_nothing(redis_url, registry_dir, r, hub):
    r.flushdb()
    resp = _client(redis_url).post("/models/shard", json={"model_id": "org/nothing"})
    assert resp.status_code == 404 and resp.get_json()["error"]["param"] == "model_id"
    _nothing_started(r, hub, "org/nothing")


def test_each_account_has_a_daily_quota(monkeypatch, redis_url, registry_dir, r, hub):
    from azu.errors import Unauthorized

    class TwoUsers(FreeBilling):
        def authenticate(self, api_key):
            if api_key not in ("alice", "bob"):
                raise Unauthorized("unknown or revoked API key")
            return api_key

    r.flushdb()
    monkeypatch.setenv("AZU_SHARD_QUOTA", "2")
    client = _client(redis_url, TwoUsers())

    def ask(user: str, i: int):
        return client.post("/models/shard", json={"model_id": f"org/model-{i}"},
                           headers={"Authorization": f"Bearer {user}"})

    assert [ask("alice", i).status_code for i in (0, 1)] == [202, 202]
    refused = ask("alice", 2)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "shard_quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert not r.exists("azu:model:org/model-2") and r.llen(REGISTRY_QUEUE) == 2
    # Asking again for a model already on its way costs nothing; another account has its own quota.
    assert ask("alice", 0).status_code == 202
    assert ask("bob", 2).status_code == 202
    assert r.llen(REGISTRY_QUEUE) == 3


def test_a_ready_model_is_not_replaced(monkeypatch, redis_url, registry_dir, r, demo_src):
    r.flushdb()
    monkeypatch.setenv("AZU_ALLOWED_MODEL_DIRS", str(demo_src.parent))
    client = _client(redis_url)
    assert client.get(f"/models/status?model_id={MODEL_ID}").get_json()["state"] == "ready"
    before = dict(r.hgetall(f"azu:model:{MODEL_ID}"))
    # The same served id from another source (a folder named like it): refused, nothing changed.
    resp = client.post("/models/shard", json={"model_id": str(demo_src)})
    assert resp.status_code == 409, resp.get_json()
    assert "AZU_ALLOW_RESHARD" in resp.get_json()["error"]["message"]
    assert dict(r.hgetall(f"azu:model:{MODEL_ID}")) == before
    assert r.llen(REGISTRY_QUEUE) == 0
    # Asking for it as it is changes nothing either.
    same = client.post("/models/shard", json={"model_id": MODEL_ID})
    assert same.status_code == 200 and same.get_json()["state"] == "ready"
    assert r.llen(REGISTRY_QUEUE) == 0
    # The operator may allow replacing it.
    monkeypatch.setenv("AZU_ALLOW_RESHARD", "1")
    resp = client.post("/models/shard", json={"model_id": str(demo_src)})
    assert resp.status_code == 202 and resp.get_json()["state"] == "pending"
    assert r.llen(REGISTRY_QUEUE) == 1
    r.delete(f"azu:model:{MODEL_ID}")  # the next test sees the model ready again (from its folder)


def test_the_registry_task_checks_the_cap_too(monkeypatch, redis_url, registry_dir, r, hub, demo_src):
    from azu.registry import status as shard_status

    r.flushdb()
    monkeypatch.setenv("AZU_MAX_SHARD_BYTES", "1")
    # A task that did not come through the API (straight onto the queue) is checked before any download.
    result = shard_status.run_shard(r, "org/model-3", "org/model-3")
    assert result["state"] == "failed" and "AZU_MAX_SHARD_BYTES" in (result["reason"] or "")
    assert hub.resolved() == []
    assert not (registry_dir / "org--model-3").exists()


# --- a positive balance (the real ledger) ------------------------------------------------------------------
@pytest.fixture
def ledger_engine() -> Iterator[Engine]:
    from azu.billing.ledger.db import make_engine, migrate
    from tests.support.database import create_database, drop_database

    url = create_database("azu_test_shard")
    engine = make_engine(url)
    try:
        migrate(url)
        yield engine
    finally:
        engine.dispose()
        drop_database(url)


@pytest.mark.postgres
def test_sharding_needs_a_positive_balance(redis_url, registry_dir, r, hub, ledger_engine):
    from azu.billing import accounts
    from azu.billing.ledger import service
    from azu.billing.ledger.billing import LedgerBilling
    from azu.billing.ledger.db import session_scope

    r.flushdb()
    address = Account.create().address
    with session_scope(ledger_engine) as s:
        accounts.store_api_key(s, address=address, key_hash=accounts.hash_api_key("azu_test"), label=None)
    client = _client(redis_url, LedgerBilling(ledger_engine, price_per_token_layer=1))
    headers = {"Authorization": "Bearer azu_test"}
    assert client.post("/models/shard", json={"model_id": "org/model-0"}).status_code == 401
    broke = client.post("/models/shard", json={"model_id": "org/model-0"}, headers=headers)
    assert broke.status_code == 402 and "positive balance" in broke.get_json()["error"]["message"]
    _nothing_started(r, hub, "org/model-0")
    assert hub.requests == []  # refused before the hub was even asked
    with session_scope(ledger_engine) as s:
        service.credit_deposit(s, tx_id="0x" + "01" * 32, sender=address, amount=1)
    paid = client.post("/models/shard", json={"model_id": "org/model-0"}, headers=headers)
    assert paid.status_code == 202 and r.llen(REGISTRY_QUEUE) == 1
