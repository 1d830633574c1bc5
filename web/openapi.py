"""The API contract: an OpenAPI 3.1 document built from the pydantic models that validate the requests.

``GET /openapi.json`` is generated, never written by hand: the paths come from the app's URL map, each
route's request and answer schemas from ``web.schemas`` (``pydantic.json_schema.models_json_schema``, the
same models ``parse_body`` validates with) and the small table ``ROUTES`` below (summary, body, query
parameters, answers per status). A route missing from the table is missing from the document, and
tests/api/test_contract.py fails naming it. Another area's blueprint documents its routes with
``describe(Op(...))`` on the view function instead of an entry here.

``GET /docs`` is Swagger UI over the document, served from the swagger-ui-bundle package (no CDN).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.exceptions import NotFound
from werkzeug.routing import Rule

from web import schemas as s
from web.limits import LIMITED, LIMITED_BLUEPRINTS

bp = Blueprint("openapi", __name__)

TITLE = "azu API"
VERSION = "1"
REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    required: bool = True


# An answer: a pydantic model (JSON), or (media type, description) for files, pages and event streams.
Answer = type[BaseModel] | tuple[str, str]
# A request body: a pydantic model, or "module:Name" for a model of another area's module (imported when
# the document is built).
Body = type[BaseModel] | str


@dataclass(frozen=True)
class Op:
    summary: str
    ok: dict[int, Answer]
    body: Body | None = None
    query: tuple[Query, ...] = ()
    auth: bool = False
    errors: tuple[int, ...] = ()  # statuses beyond the ones every route or every body route can answer
    tags: tuple[str, ...] = ()
    description: str | None = None


def describe(op: Op) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Document a view function where it is defined (for blueprints of other areas)."""
    def mark(view: Callable[..., Any]) -> Callable[..., Any]:
        view.__openapi__ = op  # type: ignore[attr-defined]
        return view
    return mark


MODEL_ID_QUERY = Query("model_id", "the served model id, e.g. 'org/name'")
_BINARY = ("application/octet-stream", "a shard file (manifest.json is served as application/json)")

# endpoint -> what the route takes and answers. Status codes every route can answer (414, 431, 500, 503),
# those of every JSON body route (400, 413, 415), 401 for authenticated and 429 for rate-limited routes are
# added by ``_operation``.
ROUTES: dict[str, Op] = {
    "health.healthz": Op("Liveness", {200: s.Health}, tags=("operations",)),
    "openapi.document": Op("This document (OpenAPI 3.1)", {200: ("application/json", "the OpenAPI document")},
                           tags=("operations",)),
    "openapi.docs": Op("Swagger UI over this document", {200: ("text/html", "the docs page")},
                       tags=("operations",)),
    "openapi.docs_asset": Op("A file of the docs page", {200: ("application/octet-stream", "a static file")},
                             errors=(404,), tags=("operations",)),
    "jobs.submit": Op("Start a job", {202: s.SubmitAccepted}, body=s.SubmitRequest, auth=True,
                      errors=(402, 404, 409), tags=("jobs",)),
    "jobs.results": Op("A job's status, tokens, usage and verification", {200: s.JobResult}, auth=True,
                       errors=(404,), tags=("jobs",),
                       description="`verification` is null while the job runs, then `pending` (picked for a "
                                   "check that runs after the answer), `not_checked`, `verified`, `failed` "
                                   "(the stage's earnings withheld, the user refunded) or `inconclusive`."),
    "openai.list_models": Op("Models ready to serve (OpenAI)", {200: s.ModelList}, auth=True,
                             tags=("openai",)),
    "openai.chat_completions": Op(
        "Chat completion (OpenAI), plain or streamed",
        {200: s.ChatCompletion}, body=s.ChatCompletionRequest, auth=True, errors=(402, 404, 409, 502, 504),
        tags=("openai",),
        description="With `stream: true` the answer is `text/event-stream`: one `ChatCompletionChunk` per "
                    "`data:` line, then `data: [DONE]`. The extension field `azu` (on the answer, and on the "
                    "final chunk of a stream) names the job and its verification as it stands when the "
                    "answer is sent (checks run afterwards: usually `pending`, `not_checked` or null); "
                    "`azu.verification.url` is the job's `/results` to poll for the outcome."),
    "registry.shard": Op("Ask for a model to be sharded", {200: s.ShardStatus, 202: s.ShardStatus},
                         body=s.ShardRequest, auth=True, errors=(402, 403, 404, 409), tags=("registry",),
                         description="Authorized only for an account with a positive balance, a checkpoint "
                                     "no larger than AZU_MAX_SHARD_BYTES (read from the hub listing before "
                                     "any download) and within the account's daily AZU_SHARD_QUOTA."),
    "registry.status": Op("A model's sharding status", {200: s.ShardStatus}, query=(MODEL_ID_QUERY,),
                          errors=(400, 404), tags=("registry",)),
    "registry.file_by_query": Op("A file of a ready model's shard folder", {200: _BINARY},
                                 query=(MODEL_ID_QUERY,), errors=(400, 404), tags=("registry",)),
    "registry.file_by_path": Op("A file of a ready model's shard folder", {200: _BINARY}, errors=(400, 404),
                                tags=("registry",)),
    "accounts.deposit": Op("Credit an on-chain deposit, once", {201: s.DepositReceipt}, body=s.DepositRequest,
                           errors=(404, 409), tags=("accounts",)),
    "accounts.balance": Op("The caller's balance", {200: s.BalanceView}, auth=True, tags=("accounts",)),
    "accounts.auth_challenge": Op("A single-use text for the wallet to sign", {201: s.ChallengeView},
                                  body=s.ChallengeRequest, tags=("accounts",)),
    "accounts.auth_create_key": Op("A new API key for a signed challenge (shown once)", {201: s.NewKey},
                                   body=s.KeyRequest, tags=("accounts",)),
    "accounts.auth_list_keys": Op("The caller's API keys", {200: s.KeyList}, auth=True, tags=("accounts",)),
    "accounts.auth_revoke_key": Op("Revoke one of the caller's API keys", {200: s.KeyView}, auth=True,
                                   errors=(404,), tags=("accounts",)),
    # worker enrollment (web/workers.py)
    "workers.challenge": Op("A single-use enrollment challenge for a worker id",
                            {201: ("application/json", "worker_id, challenge, expires_in")},
                            body="web.workers:WorkerChallengeRequest", tags=("workers",)),
    "workers.enroll": Op("Enroll a worker's Ed25519 key: its broker login",
                         {201: ("application/json", "the worker's broker login and the core's public key")},
                         body="web.workers:EnrollRequest", errors=(401, 403, 409), tags=("workers",)),
    # the web page (web/pages.py)
    "pages.index": Op("The web page: chat playground, balance, API keys, the network",
                      {200: ("text/html", "the page")}, tags=("pages",)),
    "pages.network": Op("The network: live workers, the spans they hold, tokens/s",
                        {200: ("application/json", "workers, models and their holders, throughput")},
                        tags=("pages",)),
    "pages.static": Op("A file of the web page (CSS, JavaScript)",
                       {200: ("application/octet-stream", "a static file")}, errors=(404,), tags=("pages",)),
}

_EVERY_ROUTE = (414, 431, 500, 503)
_BODY_ROUTE = (400, 413, 415)
_REASONS = {400: "Bad request", 401: "Missing, unknown or revoked API key", 402: "Balance too low",
            403: "Forbidden", 404: "Not found", 409: "Conflict", 413: "Body too large",
            414: "URL too long", 415: "Body is not application/json", 429: "Rate limited (see Retry-After)",
            431: "Headers too large", 500: "Internal error", 502: "Upstream failure",
            503: "A dependency is unavailable or no capacity (see Retry-After)", 504: "Timed out"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 1}}}


Refs = dict[Any, dict[str, Any]]  # (model, mode) -> its {"$ref": ...}


def _op_of(app: Flask, endpoint: str) -> Op | None:
    view = app.view_functions.get(endpoint)
    op = getattr(view, "__openapi__", None)
    # A rate-limited view is wrapped: the mark may be on the wrapped function.
    op = op or getattr(getattr(view, "__wrapped__", None), "__openapi__", None)
    return op if isinstance(op, Op) else ROUTES.get(endpoint)


def _body_model(body: Body) -> type[BaseModel]:
    if isinstance(body, str):
        module, name = body.split(":")
        model = getattr(importlib.import_module(module), name)
        assert isinstance(model, type) and issubclass(model, BaseModel), body
        return model
    return body


def _limited(endpoint: str) -> bool:
    return endpoint in LIMITED or endpoint.split(".", 1)[0] in LIMITED_BLUEPRINTS


def _openapi_path(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    params = []
    path = rule.rule
    for match in re.finditer(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>", rule.rule):
        converter, name = match.group(1) or "default", match.group(2)
        schema: dict[str, Any] = {"type": "integer"} if converter == "int" else {"type": "string"}
        if converter not in ("int", "path"):
            schema["pattern"] = "^[^/]+$"
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
        path = path.replace(match.group(0), "{" + name + "}")
    return path, params


def _content(answer: Answer, refs: Refs) -> dict[str, Any]:
    if isinstance(answer, tuple):
        media, description = answer
        schema: dict[str, Any] = ({"type": "string"} if media == "text/html"
                                  else {} if media == "application/json"
                                  else {"type": "string", "format": "binary"})
        return {"description": description, "content": {media: {"schema": schema}}}
    return {"description": answer.__name__,
            "content": {"application/json": {"schema": refs[(answer, "serialization")]}}}


def _operation(endpoint: str, op: Op, path_params: list[dict[str, Any]],
               refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": endpoint.replace(".", "_"), "summary": op.summary,
                           "tags": list(op.tags)}
    if op.description:
        out["description"] = op.description
    params = list(path_params) + [{"name": q.name, "in": "query", "required": q.required,
                                   "description": q.description, "schema": {"type": "string", "minLength": 1}}
                                  for q in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True,
                              "content": {"application/json": {
                                  "schema": refs[(_body_model(op.body), "validation")]}}}
    responses: dict[str, Any] = {str(status): _content(answer, refs) for status, answer in op.ok.items()}
    if endpoint == "openai.chat_completions":
        responses["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    errors = set(op.errors) | set(_EVERY_ROUTE)
    if op.body is not None:
        errors |= set(_BODY_ROUTE)
    if op.auth:
        errors.add(401)
        out["security"] = [{"bearer": []}, {"apiKey": []}]
    if _limited(endpoint):
        errors.add(429)
    for status in sorted(errors):
        answer = {"description": _REASONS.get(status, "Error"),
                  "content": {"application/json": {"schema": refs[(s.ErrorBody, "serialization")]}}}
        if status in (429, 503):
            answer["headers"] = _RETRY_AFTER
        responses[str(status)] = answer
    out["responses"] = responses
    return out


def build(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``: every rule of its URL map that has an ``Op``."""
    rules = sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint))
    ops = {rule.endpoint: op for rule in rules if (op := _op_of(app, rule.endpoint)) is not None}
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(s.ErrorBody, "serialization")]
    for op in ops.values():
        if op.body is not None:
            wanted.append((_body_model(op.body), "validation"))
        wanted += [(a, "serialization") for a in op.ok.values() if not isinstance(a, tuple)]
    wanted = list(dict.fromkeys(wanted))
    refs, defs = models_json_schema(wanted, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for rule in rules:
        op = ops.get(rule.endpoint)
        if op is None:
            continue
        path, params = _openapi_path(rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule.endpoint, op, params, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "Decentralized LLM inference. Errors on every route and status have OpenAI's "
                                "shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }


def undocumented(app: Flask) -> list[str]:
    """Endpoints of the URL map that the document leaves out (there should be none)."""
    return sorted({r.endpoint for r in app.url_map.iter_rules() if _op_of(app, r.endpoint) is None})


# --- routes ------------------------------------------------------------------------------------------------
_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>azu API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
_DOCS_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")


def _swagger_dir() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


@bp.get("/openapi.json")
def document() -> Response:
    doc = current_app.extensions.get("azu.openapi")
    if doc is None:
        doc = current_app.extensions["azu.openapi"] = build(current_app)
    return jsonify(doc)


@bp.get("/docs")
def docs() -> Response:
    return Response(_DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    if name not in _DOCS_ASSETS:
        raise NotFound(f"no docs file {name!r}")
    return send_from_directory(_swagger_dir(), name, max_age=3600)


