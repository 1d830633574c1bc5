"""Every error answers JSON in one shape, OpenAI's, on every route and status:

    {"error": {"message": ..., "type": ..., "param": ... | null, "code": ... | null}}

azu's own errors (azu.errors.AzuError) carry their status, code and param; werkzeug's (404, 405, 413, 415...)
and Flask-Limiter's 429 keep their status; an unreachable Redis or PostgreSQL is a 503, never a 500. Every
503 and 429 carries ``Retry-After`` (seconds).
"""

from __future__ import annotations

import logging
import math

import redis
from flask import Flask, Response, current_app, jsonify, request
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from azu.errors import AzuError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 503 tells the client to wait before trying again

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}

# A dependency that cannot be reached: the request may succeed later, so 503 + Retry-After.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the connection pool is exhausted
)
try:
    import kombu.exceptions
    import psycopg

    _UNAVAILABLE += (kombu.exceptions.OperationalError,)

    _UNAVAILABLE += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - both are install requirements (celery[redis], psycopg)
    pass

# Headers of werkzeug's own answers worth keeping (405's Allow; a 503's own Retry-After).
_KEEP_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


def error_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "api_error")


def openai_error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict:
    """OpenAI's error object (also sent as the last event of a stream that fails)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   retry_after: int | None = None) -> tuple[Response, int]:
    response = jsonify(openai_error_body(status, message, code=code, param=param))
    if retry_after is None and status == 503:
        retry_after = RETRY_AFTER_S
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after)))
    return response, status


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    elif status == 404:
        message = f"no route {request.path}; GET /openapi.json lists every route"
    retry_after = None
    if isinstance(exc, RateLimitExceeded):
        from web.limits import retry_after_s

        retry_after = retry_after_s(current_app) or math.ceil(exc.limit.limit.get_expiry())
        message = f"rate limit exceeded ({exc.limit.limit}); retry after the time in Retry-After"
    response, status = error_response(status, message, code=exc.name.lower().replace(" ", "_"),
                                      retry_after=retry_after)
    for name, value in exc.get_headers():
        if name in _KEEP_HEADERS:
            response.headers[name] = value
    return response, status


def init_app(app: Flask) -> None:
    @app.errorhandler(AzuError)
    def _azu_error(exc: AzuError):
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param,
                              retry_after=getattr(exc, "retry_after", None))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return _http_error(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, _UNAVAILABLE):
            # The dependency's own message may hold a URL with a password: log the type only.
            log.warning("dependency unavailable on %s %s: %s", request.method, request.path,
                        type(exc).__name__)
            return error_response(503, "a service azu depends on (Redis or the database) is unavailable; "
                                  "retry later", code="service_unavailable")
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error; the server log has the details", code="internal_error")
