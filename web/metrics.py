"""``GET /metrics``: Prometheus exposition of this API's counts (every gunicorn process's) and the core's.

Every request is counted by route template (``/results/<job_id>``, never the id), method and status, and
timed to its answer's headers; a 4xx also counts under its error code. With ``PROMETHEUS_MULTIPROC_DIR``
set, each gunicorn process writes its counts to files there and this route sums them (prometheus_client's
multiprocess mode): the folder must be empty when gunicorn starts. The core's figures (azu.metrics.CoreFacts)
are read from Redis and the ledger at scrape time. ``AZU_METRICS_TOKEN``, when set, is required as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from azu import metrics
from azu.config import get_settings
from azu.errors import Unauthorized
from web.openapi import Op, describe

bp = Blueprint("metrics", __name__)

_STARTED = "azu_started"


def request_started() -> float:
    """``time.monotonic()`` when this request started (now, outside a counted request)."""
    return float(g.get(_STARTED) or time.monotonic())


def _route() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _start() -> None:
    g.setdefault(_STARTED, time.monotonic())


def _count(response: Response) -> Response:
    try:
        route, method, status = _route(), metrics.label(request.method), response.status_code
        metrics.API_REQUESTS.labels(route, method, str(status)).inc()
        metrics.API_REQUEST_SECONDS.labels(route, method).observe(time.monotonic() - request_started())
        if 400 <= status < 500:
            body: Any = response.get_json(silent=True) if response.is_json else None
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            metrics.API_REFUSALS.labels(str(status), metrics.label(code, default="none")).inc()
    except Exception:  # counting must never cost the caller the answer
        current_app.logger.debug("request not counted", exc_info=True)
    return response


def init_app(app: Flask) -> None:
    """Count every request (before any other hook, so a size refusal is counted too)."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_count)


class _Exposed:
    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def collect(self) -> Any:
        for part in self.parts:
            yield from part.collect()


@bp.get("/metrics")
@describe(Op("Prometheus metrics (this API's processes and the core)",
             {200: ("text/plain", "Prometheus text exposition")}, errors=(401,), tags=("operations",),
             description="With AZU_METRICS_TOKEN set, wants `Authorization: Bearer <token>`."))
def expose() -> Response:
    settings = get_settings()
    token = settings.metrics.token
    if token:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("GET /metrics wants Authorization: Bearer <AZU_METRICS_TOKEN>")
    from web import LEDGER, REDIS

    parts: list[Any] = []
    if settings.metrics.multiproc_dir:
        parts.append(MultiProcessCollector(None, path=settings.metrics.multiproc_dir))
    else:
        parts.append(metrics.API)
    if current_app.config.get("AZU_ROLE") == "api":
        parts.append(metrics.CoreFacts(current_app.extensions[REDIS],
                                       ledger=current_app.extensions.get(LEDGER)))
    return Response(generate_latest(_Exposed(parts)), content_type=CONTENT_TYPE_LATEST)  # type: ignore[arg-type]
