"""Models the registry knows: shard status in Redis, shard folders on disk, what routing needs to know.

``request_shard`` claims the model with one atomic check-and-set in Redis, so asking twice (from two API
processes at once) enqueues one sharding task. ``run_shard`` is that task's body (queue ``registry``):
it shards into a temporary folder and renames it into place, so a reader never sees half a model.

State lives in ``azu:model:<id>`` (a hash): state pending|sharding|ready|failed, progress 0..1, reason,
source, and ``info`` (JSON: layer sizes, eos ids, context length) that the API and the scheduler use
without reading the shard folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import redis

from azu.errors import Forbidden, InvalidRequest, NotFound
from azu.network.placement import ModelShape

if TYPE_CHECKING:
    from azu.network.dispatch import Dispatcher

READY_KEY = "azu:models:ready"
STATES = ("pending", "sharding", "ready", "failed")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Claim the model unless it is already pending, sharding or ready (a failed model may be asked again).
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'pending' or state == 'sharding' or state == 'ready' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'pending', 'progress', '0', 'reason', '', 'source', ARGV[1],
           'updated', ARGV[2])
return 1
"""


def model_key(model_id: str) -> str:
    return f"azu:model:{model_id}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def registry_dir() -> Path:
    return Path(os.environ.get("AZU_REGISTRY_DIR") or ".azu/registry")


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _HUB_ID.match(model_id) or ".." in model_id:
        raise InvalidRequest(f"invalid model id {model_id!r}: expected a Hugging Face id like "
                             "'org/name' or a folder name", param="model_id")
    return model_id


def shard_dir(model_id: str) -> Path:
    """The shard folder of ``model_id`` under ``AZU_REGISTRY_DIR`` ("org/name" -> "org--name")."""
    return registry_dir() / validate_model_id(model_id).replace("/", "--")


def registry_file_url(base_url: str, model_id: str, name: str) -> str:
    """Where the registry serves one file of a shard folder (manifest.json included)."""
    return f"{base_url.rstrip('/')}/models/files/{quote(name)}?model_id={quote(model_id, safe='')}"


# --- local folders ------------------------------------------------------------------------------
def allowed_model_dirs() -> list[Path]:
    raw = os.environ.get("AZU_ALLOWED_MODEL_DIRS") or ""
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p]


def is_local_source(source: str) -> bool:
    # Hub ids never start like a path, so there is no guessing between the two.
    return source.startswith(("/", "./", "../", "~"))


def check_local_source(source: str) -> Path:
    """The resolved folder, if it lies under a directory the operator allows; Forbidden otherwise."""
    path = Path(source).expanduser().resolve()
    allowed = allowed_model_dirs()
    if not any(path == d or d in path.parents for d in allowed):
        raise Forbidden("local model folders are accepted only under AZU_ALLOWED_MODEL_DIRS "
                        f"({'not set' if not allowed else 'this folder is not under it'})", param="model_id")
    if not path.is_dir():
        raise NotFound(f"no model folder at {source}", param="model_id")
    return path


def resolve_request(model_id: str, source: str | None = None) -> tuple[str, str]:
    """(served model id, source) of a shard request. A local folder is served under its folder name."""
    if source is None and is_local_source(model_id):
        source = str(check_local_source(model_id))
        model_id = Path(source).name
    elif source is not None and is_local_source(source):
        source = str(check_local_source(source))
    return validate_model_id(model_id), source or model_id


# --- status -------------------------------------------------------------------------------------
def model_status(r: redis.Redis, model_id: str) -> dict[str, Any]:
    """{"model_id", "state", "progress", "reason"}; NotFound if the model was never asked for."""
    raw = {_s(k): _s(v) for k, v in r.hgetall(model_key(model_id)).items()}
    if not raw:
        if (shard_dir(model_id) / "manifest.json").is_file():
            mark_ready(r, model_id, source=model_id)  # sharded before Redis was (re)started
            return model_status(r, model_id)
        raise NotFound(f"model {model_id!r} is not in the registry (POST /models/shard first)",
                       param="model_id")
    return {"model_id": model_id, "state": raw.get("state", "pending"),
            "progress": float(raw.get("progress") or 0.0), "reason": raw.get("reason") or None}


def ready_models(r: redis.Redis) -> list[str]:
    ids = {_s(m) for m in r.smembers(READY_KEY)}
    root = registry_dir()
    if root.is_dir():
        for d in root.iterdir():
            if (d / "manifest.json").is_file():
                ids.add(d.name.replace("--", "/"))
    return sorted(ids)


def request_shard(r: redis.Redis, model_id: str, *, source: str | None = None,
                  dispatch: Dispatcher | None = None) -> dict[str, Any]:
    """Enqueue sharding of ``model_id`` once (from ``source``: a hub id or an allowed local folder)."""
    from azu.network.dispatch import get_dispatcher

    model_id, source = resolve_request(model_id, source)
    if (shard_dir(model_id) / "manifest.json").is_file() and not r.exists(model_key(model_id)):
        mark_ready(r, model_id, source=source)
    claimed = r.eval(_CLAIM, 1, model_key(model_id), source, str(time.time()))
    if claimed:
        (dispatch or get_dispatcher()).send_task("workers.registry.shard", queue="registry",
                                   kwargs={"model_id": model_id, "source": source})
    return model_status(r, model_id)


def set_progress(r: redis.Redis, model_id: str, progress: float) -> None:
    r.hset(model_key(model_id), mapping={"progress": f"{max(0.0, min(1.0, progress)):.3f}",
                                         "updated": str(time.time())})


def run_shard(r: redis.Redis, model_id: str, source: str) -> dict[str, Any]:
    """Shard ``source`` into ``shard_dir(model_id)``; the status records success or the reason it failed."""
    from azu.errors import AzuError

    key = model_key(model_id)
    if _s(r.hget(key, "state") or b"") == "ready":
        return model_status(r, model_id)  # a redelivered task: the work is done
    r.hset(key, mapping={"state": "sharding", "progress": "0", "reason": "", "updated": str(time.time())})
    out = shard_dir(model_id)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        if is_local_source(source):
            check_local_source(source)  # again here: the task may come from anywhere on the queue
        from azu.registry.sharder import shard_model

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shard_model(source, tmp, token=os.environ.get("HF_TOKEN") or None, revision=None, progress=False)
        set_progress(r, model_id, 0.95)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.message if isinstance(exc, AzuError) else f"{type(exc).__name__}: {exc}"
        r.hset(key, mapping={"state": "failed", "reason": reason[:2000], "updated": str(time.time())})
        return model_status(r, model_id)
    mark_ready(r, model_id, source=source)
    return model_status(r, model_id)


# --- what routing needs -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    context_length: int | None
    layer_bytes: tuple[int, ...]
    embeddings_bytes: int
    head_bytes: int

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.model_id, self.layer_bytes, self.embeddings_bytes, self.head_bytes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelInfo:
        d = json.loads(raw)
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["layer_bytes"] = tuple(d["layer_bytes"])
        return cls(**d)


def info_from_folder(model_id: str, folder: Path) -> ModelInfo:
    from azu.registry.manifest import Manifest
    from azu.tokenization import context_length

    m = Manifest.load(folder)
    text_config = m.config.get("text_config")
    config: dict[str, Any] = text_config if isinstance(text_config, dict) else m.config
    eos: list[int] = []
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    for value in (gen.get("eos_token_id"), config.get("eos_token_id")):
        if isinstance(value, int):
            eos = [value]
            break
        if isinstance(value, list) and value:
            eos = [int(v) for v in value]
            break
    return ModelInfo(
        model_id=model_id, architecture=m.architecture, num_layers=m.num_layers, hidden_size=m.hidden_size,
        vocab_size=m.vocab_size, torch_dtype=m.torch_dtype, eos_token_ids=tuple(eos),
        context_length=context_length(config),
        layer_bytes=tuple(m.layer_file(i).size for i in range(m.num_layers)),
        embeddings_bytes=m.embeddings_file.size, head_bytes=m.head_file.size,
    )


def mark_ready(r: redis.Redis, model_id: str, *, source: str) -> ModelInfo:
    info = info_from_folder(model_id, shard_dir(model_id))
    pipe = r.pipeline()
    pipe.hset(model_key(model_id), mapping={"state": "ready", "progress": "1", "reason": "", "source": source,
                                            "info": info.to_json(), "updated": str(time.time())})
    pipe.sadd(READY_KEY, model_id)
    pipe.execute()
    return info


def model_info(r: redis.Redis, model_id: str) -> ModelInfo:
    """Routing facts of a ready model; NotFound if unknown, NoCapacity while it is still being sharded."""
    from azu.errors import NoCapacity

    status = model_status(r, model_id)
    if status["state"] != "ready":
        if status["state"] == "failed":
            raise NotFound(f"model {model_id!r} failed to shard: {status['reason']}", param="model")
        raise NoCapacity(f"model {model_id!r} is not ready yet ({status['state']})", param="model")
    raw = r.hget(model_key(model_id), "info")
    if raw:
        return ModelInfo.from_json(raw)
    return mark_ready(r, model_id, source=model_id)
