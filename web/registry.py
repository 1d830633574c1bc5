"""Registry routes: ask for a model to be sharded, see its status, download its shard files.

``POST /models/shard`` enqueues sharding on queue ``registry`` (once, however often it is asked);
``GET /models/status?model_id=`` reports pending / sharding / ready / failed with progress and reason.
Files of a ready model are served by name, and only names its manifest lists (plus manifest.json itself):
nothing else in the registry folder, whatever the path says. Workers check every file's SHA-256 anyway.

``create_registry_app()`` is the registry process's own small app (azu-registry, :8002); the API app
(``web.create_app``) registers the same blueprint, so one port can serve everything.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, jsonify, request, send_file

from azu.errors import InvalidRequest, NotFound
from azu.registry import status as models_api
from azu.registry.manifest import MANIFEST_NAME, Manifest
from web import serving
from web.schemas import ShardRequest, parse_body

bp = Blueprint("registry", __name__, url_prefix="/models")


@bp.post("/shard")
def shard():
    # Sharding downloads and writes gigabytes: only an authenticated caller may ask for it.
    serving.current_user()
    body = parse_body(ShardRequest)
    status = models_api.request_shard(serving.redis_client(), body.model_id)
    return jsonify(status), 200 if status.get("state") == "ready" else 202


@bp.get("/status")
def status():
    model_id = request.args.get("model_id")
    if not model_id:
        raise InvalidRequest("the model_id query parameter is required", param="model_id")
    return jsonify(models_api.model_status(serving.redis_client(), model_id))


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
    models_api.validate_model_id(model_id)
    state = models_api.model_status(serving.redis_client(), model_id).get("state")
    if state != "ready":
        raise NotFound(f"model {model_id!r} is not ready ({state})", param="model_id")
    folder = Path(models_api.shard_dir(model_id))
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


def create_registry_app(config: dict | None = None) -> Flask:
    """The registry process's app: these routes plus /healthz."""
    from web import errors
    from web.health import bp as health_bp

    app = Flask("web.registry")
    app.config.from_mapping(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=1024 * 1024)
    if config:
        app.config.update(config)
    errors.init_app(app)
    app.register_blueprint(health_bp)
    app.register_blueprint(bp)
    return app
