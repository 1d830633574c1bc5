"""Identity: wallet-signed sign-in challenges and API keys.

A user proves control of a wallet by signing a single-use challenge; they then get an API key, shown once.
Only the key's SHA-256 is stored. None of this moves money (that is ``azu.billing.ledger.service``); like
the service, every database function takes a ``Session`` first and never commits.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from azu.billing.ledger.models import ApiKey, AuthChallenge
from azu.errors import NotFound, Unauthorized

API_KEY_PREFIX = "azu_"
CHALLENGE_TTL = timedelta(minutes=5)


def new_api_key() -> str:
    """A fresh key: 256 random bits. Shown to the user once; only its hash is stored."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    # A plain sha256 is enough: the key has 256 random bits, so there is nothing to brute-force or salt.
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


# -- sign-in challenges -------------------------------------------------------------------------------------
def create_challenge(session: Session, address: str, *, ttl: timedelta = CHALLENGE_TTL) -> str:
    """A single-use text for the wallet ``address`` to sign; valid for ``ttl``."""
    nonce = secrets.token_hex(16)
    now = session.execute(select(func.now())).scalar_one()
    expires = now + ttl
    message = (
        "azu wants you to sign in with your wallet to create an API key.\n\n"
        f"Address: {address}\n"
        f"Nonce: {nonce}\n"
        f"Issued At: {now.isoformat(timespec='seconds')}\n"
        f"Expiration Time: {expires.isoformat(timespec='seconds')}"
    )
    session.add(AuthChallenge(address=address, nonce=nonce, message=message, expires_at=expires))
    session.flush()
    return message


def consume_challenge(session: Session, address: str, challenge: str) -> None:
    """Mark the challenge used; Unauthorized if it is unknown, for another address, expired or used.

    One UPDATE ... WHERE used_at IS NULL: of two concurrent uses, exactly one succeeds."""
    used = session.execute(
        update(AuthChallenge)
        .where(
            AuthChallenge.address == address,
            AuthChallenge.message == challenge,
            AuthChallenge.used_at.is_(None),
            AuthChallenge.expires_at > func.now(),
        )
        .values(used_at=func.now())
        .returning(AuthChallenge.id)
    ).scalar_one_or_none()
    if used is None:
        raise Unauthorized("unknown, expired or already used challenge; ask for a new one", param="challenge")


# -- API keys -----------------------------------------------------------------------------------------------
def store_api_key(session: Session, *, address: str, key_hash: str, label: str | None) -> ApiKey:
    key = ApiKey(address=address, key_hash=key_hash, label=label)
    session.add(key)
    session.flush()
    return key


def user_for_key_hash(session: Session, key_hash: str) -> str | None:
    """The address owning a live (not revoked) key with this sha256 hex, else None."""
    return session.execute(
        select(ApiKey.address).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()


def list_api_keys(session: Session, address: str) -> Sequence[ApiKey]:
    return list(
        session.execute(select(ApiKey).where(ApiKey.address == address).order_by(ApiKey.id)).scalars()
    )


def revoke_api_key(session: Session, address: str, key_id: int) -> ApiKey:
    """Revoke one of ``address``'s keys (NotFound for anyone else's). Idempotent."""
    key = session.execute(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.address == address).with_for_update()
    ).scalar_one_or_none()
    if key is None:
        raise NotFound(f"no API key {key_id} for this address", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = func.now()
        session.flush()
        session.refresh(key)
    return key
