"""Money and identity routes: deposits, balance, wallet-signed API keys.

    POST   /deposit          {"tx_sig", "user_pubkey"}   credit an on-chain transfer to the platform, once
    GET    /balance          (Bearer key)                 spendable balance and what running jobs hold
    POST   /auth/challenge   {"address"}                  a single-use text for the wallet to sign
    POST   /auth/keys        {"address", "challenge", "signature", "label"?}   a new API key, shown once
    GET    /auth/keys        (Bearer key)                 the caller's keys (never the keys themselves)
    DELETE /auth/keys/<id>   (Bearer key)                 revoke one of the caller's keys

The ledger is the app's ``azu.billing.factory.Ledger`` (web.create_app builds it from the settings, or from
``AZU_LEDGER_ENGINE`` / ``AZU_PAYMENT_PROVIDER`` in the app config); without a database these routes answer
503 ``ledger_unavailable``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from azu.billing import accounts
from azu.billing.ledger import service
from azu.billing.ledger.billing import run_in_transaction
from azu.billing.ledger.models import ApiKey, AuthChallenge, Deposit
from azu.config import get_settings
from azu.errors import AzuError, InvalidRequest, Unauthorized
from web import api_key, ledger
from web.schemas import ChallengeRequest, DepositRequest, KeyRequest, parse_body

log = logging.getLogger(__name__)

bp = Blueprint("accounts", __name__)


def _caller() -> str:
    """The wallet address owning the request's API key (401 otherwise)."""
    return ledger().billing.authenticate(api_key())


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "label": key.label,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


# --- routes ------------------------------------------------------------------------------------------------
@bp.post("/deposit")
def deposit():
    body = parse_body(DepositRequest)
    led = ledger()
    provider = led.provider
    claimant = provider.validate_address(body.user_pubkey)
    # Every chain-side check (succeeded, to the platform, value > 0, confirmations, real sender) in one place.
    info = provider.verify_deposit(body.tx_sig, sender=claimant)
    if not (isinstance(info.amount, int) and info.amount > 0):  # never credit what the provider let through
        raise InvalidRequest("the transaction moved no funds to the platform", param="tx_sig")

    def credit(session: Session) -> tuple[Deposit, int]:
        dep = service.credit_deposit(
            session, tx_id=info.tx_id, sender=info.sender, amount=info.amount, refuse_replay=True
        )
        return dep, service.user_balance(session, info.sender)

    dep, balance = run_in_transaction(led.engine, credit)
    log.info("deposit %s credited %d to %s", dep.tx_id, dep.amount, dep.sender)
    return jsonify(
        {
            "tx_id": dep.tx_id,
            "address": dep.sender,
            "amount": dep.amount,
            "balance": balance,
            "unit": provider.unit,
        }
    ), 201


@bp.get("/balance")
def balance():
    address = _caller()

    def read(session: Session) -> tuple[int, int]:
        return service.user_balance(session, address), service.held_for(session, address)

    available, held = run_in_transaction(ledger().engine, read)
    return jsonify({"address": address, "balance": available, "held": held})


class TooManyChallenges(AzuError):
    status = 429
    code = "too_many_challenges"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, param="address")
        self.retry_after = retry_after


def _bounded_challenge(session: Session, address: str) -> str:
    """A new challenge, keeping the table bounded: expired challenges are deleted, and an address holds at
    most AZU_MAX_OPEN_CHALLENGES unused ones (TooManyChallenges, a 429, until the oldest expires)."""
    session.execute(delete(AuthChallenge).where(AuthChallenge.expires_at <= func.now()))
    cap = get_settings().api.max_open_challenges
    open_count, oldest_expiry, now = session.execute(
        select(func.count(), func.min(AuthChallenge.expires_at), func.now())
        .where(AuthChallenge.address == address, AuthChallenge.used_at.is_(None))
    ).one()
    if open_count >= cap:
        wait = max(1, int((oldest_expiry - now).total_seconds()) + 1)
        raise TooManyChallenges(f"this address already has {open_count} unused sign-in challenges; sign one "
                                "of them or wait for it to expire", retry_after=wait)
    return accounts.create_challenge(session, address)


@bp.post("/auth/challenge")
def auth_challenge():
    body = parse_body(ChallengeRequest)
    address = ledger().provider.validate_address(body.address)
    challenge = run_in_transaction(ledger().engine, lambda s: _bounded_challenge(s, address))
    expires_in = int(accounts.CHALLENGE_TTL.total_seconds())
    return jsonify({"address": address, "challenge": challenge, "expires_in": expires_in}), 201


@bp.post("/auth/keys")
def auth_create_key():
    body = parse_body(KeyRequest)
    led = ledger()
    address = led.provider.validate_address(body.address)
    if not led.provider.verify_signature(address=address, message=body.challenge, signature=body.signature):
        raise Unauthorized("the signature does not prove control of this address", param="signature")
    new_key = accounts.new_api_key()

    def issue(session: Session) -> ApiKey:
        accounts.consume_challenge(session, address, body.challenge)  # single use, not expired, this address
        return accounts.store_api_key(
            session, address=address, key_hash=accounts.hash_api_key(new_key), label=body.label
        )

    stored = run_in_transaction(led.engine, issue)
    # The only time the key is ever shown: the database keeps its sha256.
    return jsonify({**_key_json(stored), "address": address, "key": new_key}), 201


@bp.get("/auth/keys")
def auth_list_keys():
    address = _caller()
    keys = run_in_transaction(ledger().engine, lambda s: accounts.list_api_keys(s, address))
    return jsonify({"address": address, "keys": [_key_json(k) for k in keys]})


@bp.delete("/auth/keys/<int:key_id>")
def auth_revoke_key(key_id: int):
    address = _caller()
    key = run_in_transaction(ledger().engine, lambda s: accounts.revoke_api_key(s, address, key_id))
    return jsonify(_key_json(key))
