"""Job tokens: who may act on a job's KV caches, and along which route.

Each job gets an HMAC token (``AUTH_SECRET_KEY``) over its id and its route, minted by whoever plans the
route. Every stage task checks it before touching a KV cache, so a message that names another job's cache,
or re-routes a job, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from azu.config import get_settings
from azu.errors import Forbidden

if TYPE_CHECKING:
    from azu.network.wire import Hop

log = logging.getLogger(__name__)

_DEV_SECRET = "azu-development-secret-not-for-production"
_warned_dev_secret = False


def route_key(model_id: str, route: Sequence[Hop]) -> str:
    """Canonical text of a route: what the job token signs besides the job id."""
    hops = ";".join(f"{h.worker_id}:{h.span.first}-{h.span.last}:{int(h.span.embeddings)}{int(h.span.head)}"
                    for h in route)
    return f"{model_id}|{hops}"


def _secret() -> bytes:
    global _warned_dev_secret
    secret = get_settings().auth_secret_key or ""
    if not secret:
        # A development network (tests, `azu up` without settings) still signs; production must set it.
        if not _warned_dev_secret:
            log.warning("AUTH_SECRET_KEY is not set: using the built-in development secret")
            _warned_dev_secret = True
        secret = _DEV_SECRET
    return secret.encode()


def job_token(job_id: str, model_id: str, route: Sequence[Hop]) -> str:
    """HMAC-SHA256 over the job id and its route."""
    msg = f"{job_id}\n{route_key(model_id, route)}".encode()
    return hmac.new(_secret(), msg, hashlib.sha256).hexdigest()


def check_token(token: str | None, job_id: str, model_id: str, route: Sequence[Hop]) -> None:
    """Raise Forbidden unless ``token`` is the job's token for exactly this route."""
    expected = job_token(job_id, model_id, route)
    if not isinstance(token, str) or not hmac.compare_digest(token, expected):
        raise Forbidden(f"job {job_id}: token does not match the job and its route")
