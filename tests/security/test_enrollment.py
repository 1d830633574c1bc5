"""Enrollment for real (Flask app, Redis 8 ACL users, PostgreSQL or Redis identity store): the login it
issues works and reaches only the worker's own keys; passwords rotate; challenges are single use."""

from __future__ import annotations

import pytest
import redis
from nacl.signing import SigningKey

from azu.network import enrollment, identity
from tests.support import wait_for
from tests.support.security import CORE_SEED, Stranger, fresh_id


def test_enroll_issues_a_working_login_of_its_own(app, core):
    client = app.test_client()
    s = Stranger(fresh_id())
    resp = s.enroll(client)
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["queues"] == [f"gpu.{s.worker_id}", f"ctl.{s.worker_id}"]
    assert body["core_public_key"] == SigningKey(bytes.fromhex(CORE_SEED)).verify_key.encode().hex()
    assert body["broker_url"].startswith(f"redis://w-{s.worker_id}:")
    assert core.get(identity.identity_key(s.worker_id)) == s.public_key.encode()
    assert core.sismember("azu:reporters", s.worker_id)  # the collector reads its report list from now on

    w = redis.Redis.from_url(body["broker_url"])
    assert w.ping()
    w.lpush(f"gpu.{s.worker_id}", b"x")
    assert w.llen(f"gpu.{s.worker_id}") == 1
    assert w.rpush(f"azu:pending:{s.worker_id}", b"p") == 1
    w.close()


def test_reenrolling_rotates_the_password_and_kills_old_connections(app, core):
    client = app.test_client()
    s = Stranger(fresh_id())
    first = s.enroll(client).get_json()["broker_url"]
    old = redis.Redis.from_url(first, single_connection_client=True)  # one connection, kept open
    assert old.ping()
    second = s.enroll(client)
    assert second.status_code == 201
    assert second.get_json()["broker_url"] != first
    # The connection made with the old password was killed, and the old password opens nothing any more.
    assert not [c for c in core.client_list() if c.get("user") == f"w-{s.worker_id}"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(first).ping()
    assert redis.Redis.from_url(second.get_json()["broker_url"]).ping()


def test_challenge_is_single_use_and_bound_to_its_id(app, core):
    client = app.test_client()
    s = Stranger(fresh_id())
    challenge = s.challenge(client)
    assert client.post("/workers/enroll", json=s.body(challenge)).status_code == 201
    again = client.post("/workers/enroll", json=s.body(challenge))
    assert again.status_code == 401 and again.get_json()["error"]["param"] == "challenge"

    other = Stranger(fresh_id())
    foreign = other.challenge(client)
    resp = client.post("/workers/enroll", json=s.body(foreign))  # a challenge issued for another id
    assert resp.status_code == 401
    assert core.exists(enrollment.challenge_key(foreign))  # and it was not consumed


def test_expired_challenge_is_refused(app, core):
    client = app.test_client()
    s = Stranger(fresh_id())
    challenge = s.challenge(client)
    assert 0 < core.ttl(enrollment.challenge_key(challenge)) <= enrollment.CHALLENGE_TTL_S
    core.pexpire(enrollment.challenge_key(challenge), 1)
    wait_for(lambda: not core.exists(enrollment.challenge_key(challenge)), timeout=5, what="expiry")
    assert client.post("/workers/enroll", json=s.body(challenge)).status_code == 401
    assert not core.exists(identity.identity_key(s.worker_id))


@pytest.mark.parametrize("bad", ["UPPER", "a*", "w1?", "-lead", "x" * 41, "a b", "gpu.w1", ""])
def test_worker_ids_that_would_widen_acl_patterns_are_refused(app, bad):
    resp = app.test_client().post("/workers/challenge", json={"worker_id": bad})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["param"] == "worker_id"


def test_a_bad_signature_is_refused_and_consumes_nothing(app, core):
    client = app.test_client()
    s = Stranger(fresh_id())
    challenge = s.challenge(client)
    body = s.body(challenge)
    body["signature"] = SigningKey.generate().sign(identity.enroll_message(challenge)).signature.hex()
    resp = client.post("/workers/enroll", json=body)
    assert resp.status_code == 401 and resp.get_json()["error"]["param"] == "signature"
    assert core.exists(enrollment.challenge_key(challenge))
    assert not core.exists(identity.identity_key(s.worker_id))
    assert not core.sismember("azu:reporters", s.worker_id)
    assert core.acl_getuser(f"w-{s.worker_id}") is None
