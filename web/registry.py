"""Registry routes: ask for a model to be sharded, see its status, download its shard files.

``POST /models/shard`` enqueues sharding on queue ``registry`` (once, however often it is asked);
``GET /models/status?model_id=`` reports pending / sharding / ready / failed with progress and reason.
Files of a ready model are served by name, and only names its manifest lists (plus manifest.json itself):
nothing else in the registry folder, whatever the path says. Workers check every file's SHA-256 anyway.

The registry process (azu-registry, :8002) serves these routes with ``web.create_app({"AZU_ROLE":
"registry"})``; the API app registers the same blueprint, so one port can serve everything.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, jsonify, request, send_file

from azu.billing.ledger import service
from azu.billing.ledger.billing import LedgerBilling, run_in_transaction
from azu.errors import InvalidRequest, NotFound, PaymentRequired
from azu.registry import sources
from azu.registry import status as shard_status
from azu.registry.manifest import MANIFEST_NAME, Manifest
from web import billing, current_user, redis_client
from web.schemas import ShardRequest, parse_body

bp = Blueprint("registry", __name__, url_prefix="/models")


@bp.post("/shard")
def shard():
    # Sharding downloads and writes gigabytes: only an authenticated account with money may ask for it,
    # for a checkpoint under the size cap, within its daily quota (azu.registry.status.request_shard).
    user_id = current_user()
    body = parse_body(ShardRequest)
    _require_funds(user_id)
    status = shard_status.request_shard(redis_client(), body.model_id, account=user_id)
    return jsonify(status), 200 if status.get("state") == "ready" else 202


def _require_funds(user_id: str) -> None:
    """PaymentRequired unless the account has a positive balance (FreeBilling, in development: allowed)."""
    b = billing()
    if not isinstance(b, LedgerBilling):
        return
    available = run_in_transaction(b.engine, lambda s: service.user_balance(s, user_id))
    if available <= 0:
        raise PaymentRequired("sharding a model needs a positive balance: deposit first (POST /deposit)",
                              param="model_id")


@bp.get("/status")
def status():
    model_id = request.args.get("model_id")
    if not model_id:
        raise InvalidRequest("the model_id query parameter is required", param="model_id")
    return jsonify(shard_status.model_status(redis_client(), model_id))


@bp.get("/files/<name>")
def file_by_query(name: str):
    """The form workers use: /models/files/<name>?model_id=<id> (azu.registry.status.registry_file_url)."""
    model_id = request.args.get("model_id")
    if not model_id:
        raise InvalidRequest("the model_id query parameter is required", param="model_id")
    return _send(model_id, name)


@bp.get("/<path:model_id>/files/<name>")
def file_by_path(model_id: str, name: str):
    return _send(model_id, name)


def _send(model_id: str, name: str):
    sources.validate_model_id(model_id)
    state = shard_status.model_status(redis_client(), model_id).get("state")
    if state != "ready":
        raise NotFound(f"model {model_id!r} is not ready ({state})", param="model_id")
    folder = Path(shard_status.shard_dir(model_id))
    manifest = Manifest.load(folder)
    # NotFound unless the manifest lists exactly this name
    sha256 = None if name == MANIFEST_NAME else manifest.entry(name).sha256
    # The name is now one the sharder wrote (a plain file name), but check the resolved path anyway:
    # nothing outside the model's folder is ever served, even through a symlink.
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise NotFound(f"{name!r} is not a file of {model_id}", param="name")
    response = send_file(path, mimetype="application/octet-stream" if name.endswith(".safetensors")
                         else "application/json", conditional=True, etag=sha256 or True, max_age=0)
    if sha256:
        response.headers["X-Azu-Sha256"] = sha256
    return response

