"""Every error answers JSON: OpenAI's shape under /v1, elsewhere {"error": reason, "code": ...}."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from azu.errors import AzuError

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def openai_error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict:
    """OpenAI's error object (also sent as the last event of a stream that fails)."""
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None):
    if request.path.startswith("/v1/"):
        body = openai_error_body(status, message, code=code, param=param)
    else:
        body = {"error": message, "code": code}
        if param:
            body["param"] = param
    return jsonify(body), status


def init_app(app: Flask) -> None:
    @app.errorhandler(AzuError)
    def _azu_error(exc: AzuError):
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(
            exc.code or 500, exc.description or exc.name, code=exc.name.lower().replace(" ", "_")
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error; the server log has the details", code="internal_error")
