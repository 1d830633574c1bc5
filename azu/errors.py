"""One exception hierarchy for the domain; web/ maps it to HTTP status codes in one place."""

from __future__ import annotations

import reprlib
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 8
_SHOWN.maxlevel = 2


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: cut short. What a stranger sent may be megabytes, and a
    message that quoted it whole would copy it several times over (repr, the message, the log line)."""
    return _SHOWN.repr(value)


class AzuError(Exception):
    """Base of every error azu raises on purpose. `status` is the HTTP status the API answers with."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(AzuError):
    status = 400
    code = "invalid_request"


class Unauthorized(AzuError):
    status = 401
    code = "invalid_api_key"


class PaymentRequired(AzuError):
    status = 402
    code = "insufficient_funds"


class Forbidden(AzuError):
    status = 403
    code = "forbidden"


class NotFound(AzuError):
    status = 404
    code = "not_found"


class Conflict(AzuError):
    status = 409
    code = "conflict"


class NoCapacity(AzuError):
    """No live worker serves the model and none can load it now; ``retry_after`` (seconds), where known, is
    when that may change (the API's ``Retry-After``)."""

    status = 503
    code = "no_capacity"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class IntegrityFailure(AzuError):
    """A file's bytes do not match the SHA-256 its manifest (or the hub) promised."""

    status = 502
    code = "integrity_failure"


class UnsafeFormat(AzuError):
    """Pickle-based weights (.bin/.pt/.pth/.pkl/.ckpt) are refused: they can run code when loaded."""

    status = 400
    code = "unsafe_format"


class UnsupportedArchitecture(AzuError):
    status = 400
    code = "unsupported_architecture"


class CacheFull(AzuError):
    """A stage's bounded KV cache cannot take another job's tokens."""

    status = 503
    code = "cache_full"


class JobFailed(AzuError):
    """The pipeline gave up on a job (a stage raised, a load failed); the reason says which and why."""

    status = 502
    code = "job_failed"


class JobTimeout(AzuError):
    status = 504
    code = "timeout"


class ServiceUnavailable(AzuError):
    """A dependency (Redis, PostgreSQL, the chain's RPC) cannot be reached or is not configured."""

    status = 503
    code = "service_unavailable"


class LedgerUnavailable(ServiceUnavailable):
    code = "ledger_unavailable"
