"""Worker enrollment routes (the core's API; the work is azu.network.enrollment).

    POST /workers/challenge  {"worker_id"}                                   a single-use challenge (5 min)
    POST /workers/enroll     {"worker_id", "public_key", "challenge", "signature",
                              "wallet"?, "wallet_signature"?}                 the worker's broker login

``signature``: the worker's Ed25519 key over ``b"azu-enroll\\n" + challenge`` (hex). ``wallet_signature``:
the wallet's own signature (EIP-191 / ed25519, as for API keys) over
``"azu worker <id> key <public_key> pays to <wallet>"``. Another key for an enrolled id: 403, nothing changed.
The answer carries a broker password: serve the API over TLS.
"""

from __future__ import annotations

from typing import Annotated

import redis
from flask import Blueprint, jsonify
from pydantic import Field

from azu.config import get_settings
from azu.errors import ServiceUnavailable
from azu.network import enrollment, identity
from web import billing, ledger, redis_client
from web.schemas import Strict, parse_body

bp = Blueprint("workers", __name__)

WorkerId = Annotated[str, Field(pattern=identity.WORKER_ID_RE.pattern)]
Hex = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[0-9a-fA-F]+$")]


class WorkerChallengeRequest(Strict):
    worker_id: WorkerId


class EnrollRequest(Strict):
    worker_id: WorkerId
    public_key: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    challenge: Hex
    signature: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{128}$")]
    wallet: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    wallet_signature: Annotated[str, Field(min_length=1, max_length=1000)] | None = None


def _store() -> identity.IdentityStore:
    led = ledger()
    if led.configured:
        return identity.SqlIdentityStore(led.engine, redis_client())
    return identity.RedisIdentityStore(redis_client())


def _core_public_key() -> str:
    seed = get_settings().auth_secret_key
    if not seed:
        raise ServiceUnavailable("the core's signing key (AUTH_SECRET_KEY) is not configured on this server")
    return identity.core_public_key(seed)


def _core_broker_address() -> str:
    """The broker as this server reaches it, without its login (AZU_BROKER_PUBLIC_URL overrides it)."""
    pool = redis_client().connection_pool
    kw = pool.connection_kwargs
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0) or 0}"


@bp.post("/workers/challenge")
def challenge():
    body = parse_body(WorkerChallengeRequest)
    value = enrollment.issue_challenge(redis_client(), body.worker_id)
    return jsonify({"worker_id": body.worker_id, "challenge": value,
                    "expires_in": enrollment.CHALLENGE_TTL_S}), 201


@bp.post("/workers/enroll")
def enroll():
    body = parse_body(EnrollRequest)
    settings = get_settings()
    result = enrollment.enroll(
        redis_client(),
        enrollment.EnrollRequest(**body.model_dump()),
        store=_store(),
        provider=lambda: ledger().provider,
        billing=billing(),
        broker_public_url=settings.broker_public_url or _core_broker_address(),
        core_public_key=_core_public_key(),
        registry_url=settings.registry_url,
    )
    return jsonify(result.to_json()), 201
