"""Money and identity routes: deposits, balance, wallet-signed API keys.

    POST   /deposit          {"tx_sig", "user_pubkey"}   credit an on-chain transfer to the platform, once
    GET    /balance          (Bearer key)                 spendable balance and what running jobs hold
    POST   /auth/challenge   {"address"}                  a single-use text for the wallet to sign
    POST   /auth/keys        {"address", "challenge", "signature", "label"?}   a new API key, shown once
    GET    /auth/keys        (Bearer key)                 the caller's keys (never the keys themselves)
    DELETE /auth/keys/<id>   (Bearer key)                 revoke one of the caller's keys

``init_app(app)`` wires the ledger from ``app.config``: ``AZU_LEDGER_ENGINE`` (an Engine) or
``DATABASE_URL`` (else the environment's), and ``AZU_PAYMENT_PROVIDER`` (a PaymentProvider) or
``PAYMENT_PROVIDER`` (a name for azu.payments.factory). Unless ``AZU_BILLING`` is given, the app's billing
seam (``app.extensions["azu.billing.base"]``) becomes the ledger's when a database is configured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from flask import Blueprint, Flask, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from azu.billing.ledger import service
from azu.billing.ledger.billing import LedgerBilling, hash_api_key, new_api_key, run_in_transaction
from azu.billing.ledger.db import make_engine
from azu.billing.ledger.models import ApiKey, Deposit
from azu.config import get_settings
from azu.errors import AzuError, InvalidRequest, Unauthorized
from azu.payments.base import PaymentProvider
from web.serving import api_key

log = logging.getLogger(__name__)

bp = Blueprint("accounts", __name__)

EXTENSION = "azu.billing.ledger"


class LedgerUnavailable(AzuError):
    status = 503
    code = "ledger_unavailable"


# --- request schemas (validated here, in one place) --------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True, frozen=True)


Address = Annotated[str, Field(min_length=1, max_length=128)]


class DepositRequest(_Body):
    tx_sig: Annotated[str, Field(min_length=1, max_length=200)]
    user_pubkey: Address


class ChallengeRequest(_Body):
    address: Address


class KeyRequest(_Body):
    address: Address
    challenge: Annotated[str, Field(min_length=1, max_length=2000)]
    signature: Annotated[str, Field(min_length=1, max_length=1000)]
    label: Annotated[str, Field(max_length=100)] | None = None


M = TypeVar("M", bound=BaseModel)


def parse_body(schema: type[M]) -> M:
    """The JSON body validated against ``schema``, or InvalidRequest (400) naming the offending field."""
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


# --- wiring ------------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What the routes need, built lazily from the app config (nothing connects at import or startup)."""

    config: Any
    _engine: Engine | None = None
    _provider: PaymentProvider | None = None
    _billing: LedgerBilling | None = field(default=None)

    @property
    def configured(self) -> bool:
        return bool(self.config.get("AZU_LEDGER_ENGINE") or self._database_url())

    def _database_url(self) -> str:
        return str(self.config.get("DATABASE_URL") or get_settings().database_url or "")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            engine = self.config.get("AZU_LEDGER_ENGINE")
            if engine is None:
                url = self._database_url()
                if not url:
                    raise LedgerUnavailable("the ledger is not configured on this server (DATABASE_URL)")
                engine = make_engine(url)
            self._engine = engine
        return self._engine

    @property
    def provider(self) -> PaymentProvider:
        if self._provider is None:
            provider = self.config.get("AZU_PAYMENT_PROVIDER")
            if provider is None:
                from azu.payments.factory import get_provider

                try:
                    provider = get_provider(self.config.get("PAYMENT_PROVIDER"))
                except ValueError as exc:  # missing/malformed settings: a server problem, said plainly
                    log.error("payment provider unavailable: %s", exc)
                    raise LedgerUnavailable("the payment provider is not configured on this server") from None
            self._provider = provider
        return self._provider

    @property
    def billing(self) -> LedgerBilling:
        if self._billing is None:
            self._billing = LedgerBilling(
                self.engine, normalize_address=lambda a: self.provider.validate_address(a)
            )
        return self._billing


def init_app(app: Flask) -> None:
    ledger = Ledger(app.config)
    app.extensions[EXTENSION] = ledger
    if app.config.get("AZU_BILLING") is None and ledger.configured:
        app.extensions["azu.billing.base"] = ledger.billing
    app.register_blueprint(bp)


def ledger() -> Ledger:
    return current_app.extensions[EXTENSION]


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


@bp.post("/auth/challenge")
def auth_challenge():
    body = parse_body(ChallengeRequest)
    address = ledger().provider.validate_address(body.address)
    challenge = run_in_transaction(ledger().engine, lambda s: service.create_challenge(s, address))
    return jsonify(
        {"address": address, "challenge": challenge, "expires_in": int(service.CHALLENGE_TTL.total_seconds())}
    ), 201


@bp.post("/auth/keys")
def auth_create_key():
    body = parse_body(KeyRequest)
    led = ledger()
    address = led.provider.validate_address(body.address)
    if not led.provider.verify_signature(address=address, message=body.challenge, signature=body.signature):
        raise Unauthorized("the signature does not prove control of this address", param="signature")
    api_key = new_api_key()

    def issue(session: Session) -> ApiKey:
        service.consume_challenge(session, address, body.challenge)  # single use, not expired, this address
        return service.store_api_key(
            session, address=address, key_hash=hash_api_key(api_key), label=body.label
        )

    stored = run_in_transaction(led.engine, issue)
    # The only time the key is ever shown: the database keeps its sha256.
    return jsonify({**_key_json(stored), "address": address, "key": api_key}), 201


@bp.get("/auth/keys")
def auth_list_keys():
    address = _caller()
    keys = run_in_transaction(ledger().engine, lambda s: service.list_api_keys(s, address))
    return jsonify({"address": address, "keys": [_key_json(k) for k in keys]})


@bp.delete("/auth/keys/<int:key_id>")
def auth_revoke_key(key_id: int):
    address = _caller()
    key = run_in_transaction(ledger().engine, lambda s: service.revoke_api_key(s, address, key_id))
    return jsonify(_key_json(key))
