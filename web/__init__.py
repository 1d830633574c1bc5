"""The Flask API. ``create_app()`` only wires things; each area lives in its own blueprint.

One factory for both HTTP processes: the API (``web:create_app()``, every route) and the registry
(``web:create_app({"AZU_ROLE": "registry"})``, only /healthz and the registry routes).

What a route reaches through the app is here too: the app's Redis client, its billing seam and ledger,
and the caller's API key and user id. The work between parsing and answering is azu's (azu.serving).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import redis
from flask import Flask, current_app, request

from azu.billing.base import Billing
from azu.billing.factory import Ledger, build_billing
from azu.config import get_settings

ROLES = ("api", "registry")
# Request bodies are small JSON; the registry takes only {"model_id": ...}.
MAX_BODY_BYTES = {"api": 8 * 1024 * 1024, "registry": 1024 * 1024}

REDIS = "azu.redis"
# The most Redis connections one process's pool opens. Each answer in flight holds one while it waits for
# its job's events (XREAD BLOCK): redis-py 8 caps a pool at 100 unless told, which answered the 101st
# concurrent stream 503 (MaxConnectionsError). Above any thread count an API process runs
# (azu.cli.processes.API_THREADS); Redis itself takes 10,000 clients.
REDIS_CONNECTIONS = 2048
LEDGER = "azu.ledger"
BILLING = "azu.billing"


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app of ``AZU_ROLE`` ("api", the default, or "registry").

    Tests inject through ``config``: ``REDIS_URL``, ``AZU_BILLING`` (a Billing), ``AZU_LEDGER_ENGINE``
    (an Engine) and ``AZU_PAYMENT_PROVIDER`` (a PaymentProvider); everything else comes from the settings.
    """
    config = dict(config or {})
    role = config.get("AZU_ROLE", "api")
    if role not in ROLES:
        raise ValueError(f"AZU_ROLE must be one of {', '.join(ROLES)}, got {role!r}")
    app = Flask(__name__, static_folder=None)  # files are served by the blueprints that own them
    app.config.from_mapping(MAX_CONTENT_LENGTH=MAX_BODY_BYTES[role], AZU_ROLE=role)
    app.config.update(config)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # (DefaultJSONProvider) answers keep field order

    settings = get_settings()
    if app.config.get("REDIS_URL"):
        settings = dataclasses.replace(settings, redis_url=app.config["REDIS_URL"])
    # Nothing connects here: redis-py connects on the first command, SQLAlchemy and the chain on first use.
    app.extensions[REDIS] = redis.Redis.from_url(settings.redis_url, max_connections=REDIS_CONNECTIONS)
    ledger = app.extensions[LEDGER] = Ledger(settings, engine=app.config.get("AZU_LEDGER_ENGINE"),
                                             provider=app.config.get("AZU_PAYMENT_PROVIDER"))
    chosen = app.config.get("AZU_BILLING")
    app.extensions[BILLING] = chosen if chosen is not None else build_billing(ledger)

    from web import errors, limits, metrics, openapi
    from web.health import bp as health_bp
    from web.registry import bp as registry_bp

    errors.init_app(app)
    limits.init_app(app, settings)
    metrics.init_app(app)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(registry_bp)
    app.register_blueprint(openapi.bp)
    if role == "api":
        from web.accounts import bp as accounts_bp
        from web.jobs import bp as jobs_bp
        from web.openai import bp as openai_bp
        from web.pages import bp as pages_bp
        from web.workers import bp as workers_bp

        app.register_blueprint(accounts_bp)
        app.register_blueprint(jobs_bp)
        app.register_blueprint(openai_bp)
        app.register_blueprint(workers_bp)
        app.register_blueprint(pages_bp)
    limits.limit_routes(app, settings)
    return app


# --- what routes reach through the app ------------------------------------------------------------------
def redis_client() -> redis.Redis:
    return current_app.extensions[REDIS]


def ledger() -> Ledger:
    return current_app.extensions[LEDGER]


def billing() -> Billing:
    """``AZU_BILLING`` when given, else the ledger's when a database is configured, else FreeBilling."""
    return current_app.extensions[BILLING]


def request_timeout_s() -> float:
    """How long a request waits for its job before giving up (AZU_REQUEST_TIMEOUT_S)."""
    return get_settings().request_timeout_s


def api_key() -> str | None:
    """The caller's key: ``Authorization: Bearer <key>`` (what the openai client sends) or ``X-API-Key``."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def current_user() -> str:
    """The authenticated user id (billing raises Unauthorized, a 401, for an unknown or revoked key)."""
    return billing().authenticate(api_key())
