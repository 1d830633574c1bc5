"""Deposits, balance and wallet-signed API keys through Flask's test client, against the real PostgreSQL and
the real Hyperliquid provider on an in-process EVM (web3's EthereumTesterProvider, py-evm)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from web3 import EthereumTesterProvider, Web3

from azu.billing.ledger import service
from azu.billing.ledger.billing import LedgerBilling
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import ApiKey, Deposit
from azu.errors import PaymentRequired, Unauthorized
from azu.payments.hyperliquid import HyperliquidProvider
from tests.support.chain import deploy_reverting_contract
from web import create_app

pytestmark = [pytest.mark.postgres, pytest.mark.chain]

HYPE = 10**18


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def platform(w3: Web3) -> LocalAccount:
    return Account.create()


@pytest.fixture
def provider(w3: Web3, platform: LocalAccount) -> HyperliquidProvider:
    return HyperliquidProvider(web3=w3, private_key=platform.key.to_0x_hex())


def make_app(engine: Engine, provider: HyperliquidProvider) -> Flask:
    # Rate limits off: these tests are about the ledger (tests/api/test_limits.py tests the limits), and the
    # 50-thread test is one client address.
    return create_app({"TESTING": True, "AZU_LEDGER_ENGINE": engine, "AZU_PAYMENT_PROVIDER": provider,
                       "RATELIMIT_ENABLED": False})


@pytest.fixture
def app(engine: Engine, provider: HyperliquidProvider) -> Flask:
    return make_app(engine, provider)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


def wallet(w3: Web3, value: int = 10 * HYPE) -> LocalAccount:
    """A user wallet with a key we hold (to sign challenges), funded from a tester account."""
    acct = Account.create()
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": acct.address, "value": value})
    return acct


def send(w3: Web3, sender: LocalAccount, to: str, value: int, *, gas: int = 21_000) -> str:
    tx = {
        "to": to,
        "value": value,
        "gas": gas,
        "gasPrice": w3.eth.gas_price,
        "nonce": w3.eth.get_transaction_count(sender.address),
        "chainId": w3.eth.chain_id,
    }
    raw = sender.sign_transaction(tx).raw_transaction
    return w3.eth.send_raw_transaction(raw).to_0x_hex()


def deposit(client: FlaskClient, tx: str, claimant: str) -> Any:
    return client.post("/deposit", json={"tx_sig": tx, "user_pubkey": claimant})


def balance_of(engine: Engine, address: str) -> int:
    with session_scope(engine) as s:
        return service.user_balance(s, address)


def deposits(engine: Engine) -> int:
    with session_scope(engine) as s:
        return s.execute(select(func.count()).select_from(Deposit)).scalar_one()


def login(client: FlaskClient, user: LocalAccount, label: str | None = "test") -> dict[str, Any]:
    r = client.post("/auth/challenge", json={"address": user.address.lower()})
    assert r.status_code == 201, r.json
    challenge = r.json["challenge"]
    signature = user.sign_message(encode_defunct(text=challenge)).signature.to_0x_hex()
    r = client.post(
        "/auth/keys",
        json={"address": user.address, "challenge": challenge, "signature": signature, "label": label},
    )
    assert r.status_code == 201, r.json
    return r.json


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- deposits ----------------------------------------------------------------------------------------------


def test_deposit_is_credited_once_to_the_real_sender(
    w3: Web3, client: FlaskClient, engine: Engine, provider: HyperliquidProvider
) -> None:
    user = wallet(w3)
    tx = send(w3, user, provider.platform_address, HYPE)
    r = deposit(client, tx, user.address.lower())  # the claim may use any spelling of the address
    assert r.status_code == 201, r.json
    assert r.json["amount"] == HYPE and r.json["address"] == user.address and r.json["balance"] == HYPE
    assert balance_of(engine, user.address) == HYPE

    replay = deposit(client, tx.upper().replace("0X", "0x"), user.address)  # same tx, other spelling
    assert replay.status_code == 409
    assert "already credited" in replay.json["error"]["message"]
    assert balance_of(engine, user.address) == HYPE
    assert deposits(engine) == 1


def test_deposit_claimed_by_someone_else_is_refused_and_the_sender_can_still_claim(
    w3: Web3, client: FlaskClient, engine: Engine, provider: HyperliquidProvider
) -> None:
    user, thief = wallet(w3), wallet(w3)
    tx = send(w3, user, provider.platform_address, HYPE)
    r = deposit(client, tx, thief.address)
    assert r.status_code == 400 and r.json["error"]["param"] == "user_pubkey"
    assert balance_of(engine, thief.address) == 0 and deposits(engine) == 0
    assert deposit(client, tx, user.address).status_code == 201


def test_deposit_sent_elsewhere_failed_unknown_or_malformed_is_refused(
    w3: Web3, client: FlaskClient, engine: Engine, platform: LocalAccount
) -> None:
    user = wallet(w3)
    elsewhere = send(w3, user, Account.create().address, HYPE)
    r = deposit(client, elsewhere, user.address)
    assert r.status_code == 400 and "platform address" in r.json["error"]["message"]

    r = deposit(client, "0x" + "ab" * 32, user.address)
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = deposit(client, "0x1234", user.address)
    assert r.status_code == 400 and r.json["error"]["param"] == "tx_sig"
    r = deposit(client, send(w3, user, w3.eth.accounts[0], 0), "not-an-address")
    assert r.status_code == 400 and r.json["error"]["param"] == "address"

    # A platform address whose transfers revert: the transaction is mined, and failed.
    contract = deploy_reverting_contract(w3)
    reverting = HyperliquidProvider(web3=w3, private_key=platform.key.to_0x_hex(), platform_address=contract)
    failed = send(w3, user, contract, HYPE, gas=100_000)
    with make_app(engine, reverting).test_client() as other:
        r = deposit(other, failed, user.address)
    assert r.status_code == 400 and "failed on chain" in r.json["error"]["message"]
    assert balance_of(engine, user.address) == 0 and deposits(engine) == 0


def test_unconfirmed_deposit_is_refused_until_it_has_enough_confirmations(
    w3: Web3, engine: Engine, platform: LocalAccount
) -> None:
    strict = HyperliquidProvider(web3=w3, private_key=platform.key.to_0x_hex(), min_confirmations=3)
    user = wallet(w3)
    tx = send(w3, user, strict.platform_address, HYPE)
    with make_app(engine, strict).test_client() as c:
        early = deposit(c, tx, user.address)
        assert early.status_code == 409 and "confirmation" in early.json["error"]["message"]
        assert balance_of(engine, user.address) == 0
        w3.provider.ethereum_tester.mine_blocks(2)  # type: ignore[attr-defined]
        assert deposit(c, tx, user.address).status_code == 201
    assert balance_of(engine, user.address) == HYPE


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tx_sig": "0x" + "ab" * 32}, "user_pubkey"),
        ({"tx_sig": 5, "user_pubkey": "0xabc"}, "tx_sig"),
        ({"tx_sig": "0xab", "user_pubkey": "0xabc", "amount": 10**30}, "amount"),
    ],
)
def test_deposit_body_is_validated(client: FlaskClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/deposit", json=body)
    assert r.status_code == 400
    assert r.json["error"]["param"] == param and r.json["error"]["code"] == "invalid_request"


def test_deposit_body_must_be_json(client: FlaskClient) -> None:
    r = client.post("/deposit", data="tx_sig=1", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and "application/json" in r.json["error"]["message"]
    r = client.post("/deposit", json=["tx_sig"])
    assert r.status_code == 400 and "JSON object" in r.json["error"]["message"]


@pytest.mark.slow  # 50 threads through the whole app: half a second or more
def test_50_concurrent_deposit_requests_for_one_tx_credit_once(
    w3: Web3, app: Flask, engine: Engine, provider: HyperliquidProvider
) -> None:
    user = wallet(w3)
    tx = send(w3, user, provider.platform_address, 3 * HYPE)
    barrier = threading.Barrier(50, timeout=60)
    chain_lock = (
        threading.Lock()
    )  # py-evm's in-process chain is not thread-safe; the ledger part is what races
    original = provider.verify_deposit

    def serialized_verify(*args: Any, **kwargs: Any) -> Any:
        with chain_lock:
            return original(*args, **kwargs)

    provider.verify_deposit = serialized_verify  # type: ignore[method-assign]

    def one(_: int) -> int:
        with app.test_client() as c:
            barrier.wait()
            return deposit(c, tx, user.address).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = Counter(pool.map(one, range(50)))
    assert codes == Counter({201: 1, 409: 49})
    assert balance_of(engine, user.address) == 3 * HYPE
    assert deposits(engine) == 1


# --- API keys and balance ----------------------------------------------------------------------------------


def test_wallet_signed_key_gives_access_to_balance_and_can_be_revoked(
    w3: Web3, client: FlaskClient, engine: Engine, provider: HyperliquidProvider
) -> None:
    user = wallet(w3)
    assert (
        deposit(client, send(w3, user, provider.platform_address, 2 * HYPE), user.address).status_code == 201
    )
    issued = login(client, user, label="laptop")
    assert issued["key"].startswith("azu_") and issued["address"] == user.address
    with session_scope(engine) as s:  # only the hash is stored
        stored = s.execute(select(ApiKey.key_hash)).scalars().all()
    assert issued["key"] not in stored and len(stored) == 1 and len(stored[0]) == 64

    r = client.get("/balance", headers=bearer(issued["key"]))
    assert r.status_code == 200
    assert r.json == {"address": user.address, "balance": 2 * HYPE, "held": 0}

    second = login(client, user, label=None)
    r = client.get("/auth/keys", headers=bearer(second["key"]))
    assert [k["label"] for k in r.json["keys"]] == ["laptop", None]
    assert all("key" not in k and "key_hash" not in k for k in r.json["keys"])

    r = client.delete(f"/auth/keys/{issued['id']}", headers=bearer(second["key"]))
    assert r.status_code == 200 and r.json["revoked_at"] is not None
    r = client.get("/balance", headers=bearer(issued["key"]))
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key"
    assert client.get("/balance", headers=bearer(second["key"])).status_code == 200


def test_keys_need_a_valid_signature_and_a_fresh_challenge(w3: Web3, client: FlaskClient) -> None:
    user, other = wallet(w3), wallet(w3)
    challenge = client.post("/auth/challenge", json={"address": user.address}).json["challenge"]
    forged = other.sign_message(encode_defunct(text=challenge)).signature.to_0x_hex()
    body = {"address": user.address, "challenge": challenge, "signature": forged}
    r = client.post("/auth/keys", json=body)
    assert r.status_code == 401 and r.json["error"]["param"] == "signature"
    assert client.post("/auth/keys", json={**body, "signature": "0xnot-hex"}).status_code == 401

    good = user.sign_message(encode_defunct(text=challenge)).signature.to_0x_hex()
    assert client.post("/auth/keys", json={**body, "signature": good}).status_code == 201
    replay = client.post("/auth/keys", json={**body, "signature": good})
    assert replay.status_code == 401 and replay.json["error"]["param"] == "challenge"

    # a challenge issued for another address cannot be used, even when correctly signed by its owner
    theirs = client.post("/auth/challenge", json={"address": other.address}).json["challenge"]
    signed = user.sign_message(encode_defunct(text=theirs)).signature.to_0x_hex()
    r = client.post("/auth/keys", json={"address": user.address, "challenge": theirs, "signature": signed})
    assert r.status_code == 401


def test_key_routes_need_a_live_key_and_only_touch_your_own(w3: Web3, client: FlaskClient) -> None:
    alice, bob = wallet(w3), wallet(w3)
    a, b = login(client, alice), login(client, bob)
    assert client.get("/balance").status_code == 401
    assert client.get("/auth/keys", headers=bearer("azu_made_up")).status_code == 401
    r = client.delete(f"/auth/keys/{a['id']}", headers=bearer(b["key"]))
    assert r.status_code == 404
    assert client.get("/balance", headers=bearer(a["key"])).status_code == 200


def test_app_billing_is_the_ledger_and_refuses_a_hold_it_cannot_cover(
    w3: Web3, app: Flask, client: FlaskClient, provider: HyperliquidProvider, engine: Engine
) -> None:
    billing = app.extensions["azu.billing"]
    assert isinstance(billing, LedgerBilling)
    user = wallet(w3)
    key = login(client, user)["key"]
    assert deposit(client, send(w3, user, provider.platform_address, 1000), user.address).status_code == 201
    owner = billing.authenticate(key)
    assert owner == user.address
    with pytest.raises(PaymentRequired) as err:
        billing.hold(user_id=owner, job_id="j-big", model_id="m", max_token_layers=501)  # 1002 at 2 each
    assert "1002" in err.value.message and "1000" in err.value.message
    billing.hold(user_id=owner, job_id="j", model_id="m", max_token_layers=400)  # 800 held
    r = client.get("/balance", headers=bearer(key))
    assert r.json["balance"] == 200 and r.json["held"] == 800
    billing.settle(job_id="j", usage={"gpu-1": 100, "gpu-2": 150})  # 500: platform 100, workers 160 / 240
    billing.settle(job_id="j", usage={"gpu-1": 100, "gpu-2": 150})
    r = client.get("/balance", headers=bearer(key))
    assert r.json["balance"] == 500 and r.json["held"] == 0
    billing.register_worker(worker_id="gpu-1", wallet_address=user.address.lower())
    with session_scope(engine) as s:  # the wallet went through the provider's normalization
        assert service.workers_due(s, 1) == [("gpu-1", user.address, 160)]
    with pytest.raises(Unauthorized):
        billing.authenticate(None)
