"""Helpers of the attack tests (tests/security): strangers with their own Ed25519 keys and wallets, the core's
app with the enrollment routes, and snapshots of Redis keys to prove an attack changed nothing."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import redis
from eth_account import Account
from eth_account.messages import encode_defunct
from nacl.signing import SigningKey

from azu.network import identity

CORE_SEED = "11" * 32  # the core's signing key in these tests (AUTH_SECRET_KEY)


def make_app(config: dict[str, Any]):
    from web import create_app

    app = create_app(config)
    if "workers" not in app.blueprints:  # until web/__init__.py registers it
        from web.workers import bp

        app.register_blueprint(bp)
    return app


def fresh_id(prefix: str = "w") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


@dataclass
class Stranger:
    """A machine that wants to be worker ``worker_id``: its own key, maybe its own wallet."""

    worker_id: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    wallet: Any = field(default_factory=Account.create)

    @property
    def public_key(self) -> str:
        return self.key.verify_key.encode().hex()

    def challenge(self, client) -> str:
        resp = client.post("/workers/challenge", json={"worker_id": self.worker_id})
        assert resp.status_code == 201, resp.get_json()
        return str(resp.get_json()["challenge"])

    def body(self, challenge: str, *, wallet: str | None = None, wallet_signer: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"worker_id": self.worker_id, "public_key": self.public_key,
                               "challenge": challenge,
                               "signature": self.key.sign(identity.enroll_message(challenge)).signature.hex()}
        if wallet is not None:
            out["wallet"] = wallet
            if wallet_signer is not None:
                out["wallet_signature"] = wallet_sig(wallet_signer, self.worker_id, self.public_key, wallet)
        return out

    def enroll(self, client, *, with_wallet: bool = False):
        body = self.body(self.challenge(client), wallet=self.wallet.address if with_wallet else None,
                         wallet_signer=self.wallet if with_wallet else None)
        return client.post("/workers/enroll", json=body)


def wallet_sig(account: Any, worker_id: str, public_key: str, wallet: str) -> str:
    message = identity.wallet_message(worker_id, public_key, wallet)
    return "0x" + account.sign_message(encode_defunct(text=message)).signature.hex().removeprefix("0x")


def snapshot(r: redis.Redis, names: list[str]) -> dict[str, Any]:
    """Each key's serialized value and TTL (None when absent): equal snapshots mean nothing changed."""
    return {name: (r.dump(name), r.pttl(name) > 0) for name in names}


def nopermission(exc: BaseException) -> bool:
    """Whether Redis refused for lack of permission. Inside a script Redis 7.0 words it "The user executing
    the script can't run this command" (or "can't access ... keys", "can't publish"); 7.2 and later NOPERM."""
    text = f"{type(exc).__name__} {exc}"
    return ("NOPERM" in text or "NoPermission" in text or "no permissions" in text.lower()
            or "the user executing the script can't" in text.lower())
