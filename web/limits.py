"""The API's edge: request size guards, CORS and rate limits, wired onto the app by ``init_app``.

- A URL longer than ``AZU_MAX_URL_BYTES`` is a 414 and request headers larger than ``AZU_MAX_HEADER_BYTES``
  a 431, both in the one JSON error shape (gunicorn's own limits are set high so these checks answer first).
- CORS (flask-cors) for browser apps, only for the origins in ``AZU_CORS_ORIGINS`` (off by default).
- Rate limits (Flask-Limiter, counted in the app's Redis): the routes of ``LIMITED`` are limited per API key
  and per client address; a refusal is a 429 with ``Retry-After``. ``AZU_RATE_LIMIT_JOBS`` (submit, chat)
  and ``AZU_RATE_LIMIT_ACCOUNTS`` (auth, deposit, shard, enrollment) set them; "off" turns one off.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException

from azu.config import Settings

LIMITER = "azu.limiter"

# endpoint -> which limit applies ("jobs" or "accounts"). Every route of the "workers" blueprint (worker
# enrollment) is an "accounts" route too.
LIMITED = {
    "jobs.submit": "jobs",
    "openai.chat_completions": "jobs",
    "accounts.auth_challenge": "accounts",
    "accounts.auth_create_key": "accounts",
    "accounts.deposit": "accounts",
    "registry.shard": "accounts",
}
LIMITED_BLUEPRINTS = {"workers": "accounts"}


class URITooLong(HTTPException):
    code = 414
    name = "URI Too Long"


class HeadersTooLarge(HTTPException):
    code = 431
    name = "Request Header Fields Too Large"


def client_address() -> str:
    return get_remote_address() or "unknown"


def address_identity() -> str:
    return "addr:" + client_address()


def api_key_identity() -> str:
    """Who a per-key limit counts: a hash of the caller's API key (never the key), else the address."""
    from web import api_key

    key = api_key()
    if not key:
        return address_identity()
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _check_sizes(settings: Settings) -> Callable[[], None]:
    def check() -> None:
        url_bytes = len(request.environ.get("RAW_URI") or request.full_path)
        if url_bytes > settings.api.max_url_bytes:
            raise URITooLong(f"the URL is {url_bytes} bytes; at most {settings.api.max_url_bytes} are "
                             "accepted")
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.headers.items())
        if header_bytes > settings.api.max_header_bytes:
            raise HeadersTooLarge(f"the request headers are {header_bytes} bytes; at most "
                                  f"{settings.api.max_header_bytes} are accepted")
    return check


def init_app(app: Flask, settings: Settings) -> None:
    """Before the blueprints are registered: size guards, CORS. ``limit_routes`` comes after them."""
    app.before_request(_check_sizes(settings))
    if settings.api.cors_origins:
        origins: str | list[str] = ("*" if "*" in settings.api.cors_origins
                                    else list(settings.api.cors_origins))
        CORS(app, origins=origins, allow_headers=["Authorization", "Content-Type", "X-API-Key"],
             expose_headers=["Retry-After", "X-Azu-Job-Id", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                             "X-RateLimit-Reset"],
             methods=["GET", "POST", "DELETE", "OPTIONS"], max_age=600)


def limit_routes(app: Flask, settings: Settings) -> Limiter:
    """Rate-limit the routes of ``LIMITED`` (after every blueprint is registered)."""
    limiter = Limiter(
        api_key_identity,
        app=app,
        storage_uri=settings.redis_url,
        storage_options={"socket_connect_timeout": 2, "socket_timeout": 2},
        strategy="moving-window",
        key_prefix="azu:ratelimit",
        headers_enabled=False,  # web/errors.py sets Retry-After on a 429 (and only there)
        # Redis down: the route itself answers 503 when it needs Redis; the ledger routes keep working
        # with per-process counting until it is back.
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    app.extensions[LIMITER] = limiter
    limits = {"jobs": settings.api.rate_limit_jobs, "accounts": settings.api.rate_limit_accounts}

    def group_of(endpoint: str) -> str | None:
        if endpoint in LIMITED:
            return LIMITED[endpoint]
        blueprint = endpoint.rsplit(".", 1)[0] if "." in endpoint else None
        return LIMITED_BLUEPRINTS.get(blueprint or "")

    for endpoint, view in list(app.view_functions.items()):
        group = group_of(endpoint)
        value = limits.get(group) if group else None
        if not value:
            continue
        limited: Any = limiter.limit(value, key_func=api_key_identity, scope=f"{endpoint}:key")(view)
        limited = limiter.limit(value, key_func=address_identity, scope=f"{endpoint}:addr")(limited)
        app.view_functions[endpoint] = limited
    return limiter


def retry_after_s(app: Flask) -> int | None:
    """Seconds until the limit the current request broke lets a request through again."""
    limiter = app.extensions.get(LIMITER)
    current = limiter.current_limit if limiter is not None else None
    if current is None:
        return None
    return max(1, math.ceil(current.reset_at - time.time()))
