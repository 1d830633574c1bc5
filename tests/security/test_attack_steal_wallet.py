"""Attack 8 (issue "Open network"): steal a worker's earnings.

- An impostor enrolls an existing worker id with its own key and its own (validly signed) wallet: 403, and
  the identity, the stored wallet, the ledger's payout wallet, the victim's broker login and its live
  connection are all unchanged; the impostor's challenge is not even consumed.
- The real worker changes its wallet without the wallet's signature, or with another wallet's signature:
  refused, nothing changed. With the new wallet's own signature it works (the check is not vacuous).
- ``azu-worker`` hands its Celery process no DATABASE_URL (nor the core's signing key or Redis login), even
  when the operator's environment has them: a worker process cannot reach the ledger.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from eth_account import Account
from sqlalchemy import text
from werkzeug.serving import make_server

from azu.network import enrollment, identity
from tests.support.security import CORE_SEED, Stranger, fresh_id, snapshot, wallet_sig


def _ledger_wallet(app, worker_id: str) -> str | None:
    from web import LEDGER

    led = app.extensions[LEDGER]
    if not led.configured:
        return None
    with led.engine.connect() as conn:
        query = text("SELECT wallet_address FROM workers WHERE id = :w")
        return conn.execute(query, {"w": worker_id}).scalar()


def _stored(app, core: redis.Redis, worker_id: str) -> dict[str, object]:
    from web import LEDGER

    led = app.extensions[LEDGER]
    store = (identity.SqlIdentityStore(led.engine, core) if led.configured
             else identity.RedisIdentityStore(core))
    return {"identity": store.get(worker_id), "ledger_wallet": _ledger_wallet(app, worker_id),
            "redis": snapshot(core, [identity.identity_key(worker_id), identity.wallet_key(worker_id)]),
            "acl": core.acl_getuser(f"w-{worker_id}")}


def test_an_impostor_cannot_take_over_a_worker_id(app, core):
    client = app.test_client()
    victim = Stranger(fresh_id())
    resp = victim.enroll(client, with_wallet=True)
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["wallet"] == victim.wallet.address
    live = redis.Redis.from_url(resp.get_json()["broker_url"], single_connection_client=True)
    assert live.ping()
    before = _stored(app, core, victim.worker_id)
    assert before["identity"].wallet == victim.wallet.address  # type: ignore[union-attr]
    if app.extensions["azu.ledger"].configured:  # the ledger pays there (LedgerBilling.register_worker)
        assert before["ledger_wallet"] == victim.wallet.address

    impostor = Stranger(victim.worker_id)  # same id, its own key and its own wallet, all signed properly
    challenge = impostor.challenge(client)
    refused = client.post("/workers/enroll", json=impostor.body(challenge, wallet=impostor.wallet.address,
                                                                wallet_signer=impostor.wallet))
    assert refused.status_code == 403, refused.get_json()
    assert refused.get_json()["error"]["code"] == "forbidden"
    assert "broker_url" not in refused.get_json()
    assert _stored(app, core, victim.worker_id) == before
    assert core.exists(enrollment.challenge_key(challenge))  # consumed nothing
    assert live.ping()  # the victim's connection was not killed, its password not rotated

    # Without a wallet, or with the victim's public key but not its private key, it fares no better.
    challenge = impostor.challenge(client)
    assert client.post("/workers/enroll", json=impostor.body(challenge)).status_code == 403
    forged = impostor.body(challenge)
    forged["public_key"] = victim.public_key
    assert client.post("/workers/enroll", json=forged).status_code == 401
    assert _stored(app, core, victim.worker_id) == before
    assert live.ping()


def test_a_wallet_changes_only_with_the_new_wallets_signature(app, core):
    client = app.test_client()
    worker = Stranger(fresh_id())
    assert worker.enroll(client, with_wallet=True).status_code == 201
    before = _stored(app, core, worker.worker_id)
    thief = Account.create()

    unsigned = worker.body(worker.challenge(client), wallet=thief.address)
    resp = client.post("/workers/enroll", json=unsigned)
    assert resp.status_code == 401 and resp.get_json()["error"]["param"] == "wallet_signature"
    assert _stored(app, core, worker.worker_id) == before

    # Signed, but by another wallet than the one named (here the worker's current wallet vouches for it).
    wrong = worker.body(worker.challenge(client), wallet=thief.address)
    wrong["wallet_signature"] = wallet_sig(worker.wallet, worker.worker_id, worker.public_key, thief.address)
    resp = client.post("/workers/enroll", json=wrong)
    assert resp.status_code == 401 and resp.get_json()["error"]["param"] == "wallet_signature"
    assert _stored(app, core, worker.worker_id) == before

    # A signature made for another worker id or key is refused too.
    other = worker.body(worker.challenge(client), wallet=thief.address)
    other["wallet_signature"] = wallet_sig(thief, "someone-else", worker.public_key, thief.address)
    assert client.post("/workers/enroll", json=other).status_code == 401
    assert _stored(app, core, worker.worker_id) == before

    # The owner of the new wallet signing for this worker and key: the change goes through.
    new = Account.create()
    ok = client.post("/workers/enroll", json=worker.body(worker.challenge(client), wallet=new.address,
                                                         wallet_signer=new))
    assert ok.status_code == 201, ok.get_json()
    assert _stored(app, core, worker.worker_id)["identity"].wallet == new.address  # type: ignore[union-attr]
    if app.extensions["azu.ledger"].configured:
        assert _ledger_wallet(app, worker.worker_id) == new.address


@pytest.fixture
def served(app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def test_azu_worker_hands_celery_nothing_of_the_core(app, core, core_redis_url, served, tmp_path,
                                                     monkeypatch):
    from azu.cli import worker as cli

    # The operator's shell has every core secret set: none of them may reach the worker's Celery. (The core
    # serves from this process too, so AUTH_SECRET_KEY keeps the core's value.)
    for name, value in {"DATABASE_URL": "postgresql://core:secret@db/ledger", "AUTH_SECRET_KEY": CORE_SEED,
                        "REDIS_URL": core_redis_url, "SCHEDULER_PRIVATE_KEY": "0x" + "33" * 32,
                        "HF_TOKEN": "hf_secret", "AZU_WORKER_ID": "", "AZU_CORE_URL": ""}.items():
        monkeypatch.setenv(name, value)
    key_file = tmp_path / "keys" / "w.key"
    worker_id = fresh_id()
    captured: dict[str, object] = {}

    def exec_fn(path: str, argv: list[str], env: dict[str, str]) -> None:
        captured.update(path=path, argv=argv, env=env)

    assert cli.main(["--worker-id", worker_id], exec_fn=exec_fn) == 2  # no core URL: refuses to start
    assert not captured and not key_file.exists()
    code = cli.main(["--core-url", served, "--worker-id", worker_id, "--key-file", str(key_file),
                     "--device", "cpu"], exec_fn=exec_fn)
    assert code == 0
    env = captured["env"]
    assert isinstance(env, dict)
    for name in ("DATABASE_URL", "AUTH_SECRET_KEY", "SCHEDULER_PRIVATE_KEY", "HF_TOKEN"):
        assert name not in env, name
    assert env["REDIS_URL"].startswith(f"redis://w-{worker_id}:")
    assert core_redis_url.split("@")[0] not in env["REDIS_URL"]  # not the core's login
    assert env["AZU_WORKER_ID"] == worker_id and env["AZU_WORKER_KEY_FILE"] == str(key_file.resolve())
    assert env["AZU_CORE_PUBLIC_KEY"] == identity.core_public_key(CORE_SEED)
    assert f"gpu.{worker_id},ctl.{worker_id}" in captured["argv"]  # type: ignore[operator]
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert core.get(identity.identity_key(worker_id)).decode() == identity.load_or_create_key(
        key_file).verify_key.encode().hex()
    assert redis.Redis.from_url(env["REDIS_URL"]).ping()

    key_file.chmod(0o644)  # a key others can read is refused
    assert cli.main(["--core-url", served, "--worker-id", worker_id, "--key-file", str(key_file)],
                    exec_fn=exec_fn) == 2

