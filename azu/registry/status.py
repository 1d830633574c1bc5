"""Shard status: which models the registry has, as seen in Redis and on its disk, and what routing needs.

``request_shard`` claims the model with one atomic check-and-set in Redis, so asking twice (from two API
processes at once) enqueues one sharding task. ``run_shard`` is that task's body (queue ``registry``):
it shards into a temporary folder and renames it into place, so a reader never sees half a model.

State lives in ``azu:model:<id>`` (a hash, ``azu.network.keys.model``): state pending|sharding|ready|failed,
progress 0..1, reason, source, and ``info`` (JSON: layer sizes, eos ids, context length) that the API and
the scheduler use without reading the shard folder. Where a model comes from (a hub id, an allowed local
folder) is ``azu.registry.sources``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from azu.config import Settings, get_settings
from azu.errors import AzuError, Conflict, NoCapacity, NotFound
from azu.network import keys
from azu.network.dispatch import Dispatcher, send_shard
from azu.network.placement import ModelShape
from azu.registry.manifest import MANIFEST_NAME, Manifest
from azu.registry.sharder import shard_model
from azu.registry.sources import (
    check_local_source,
    check_size,
    is_local_source,
    resolve_request,
    validate_model_id,
)
from azu.tokenization import context_length

STATES = ("pending", "sharding", "ready", "failed")

# Claim the model unless it is already pending, sharding or ready (a failed model may be asked again; a
# ready one only when ARGV[3] is "1", the operator's AZU_ALLOW_RESHARD).
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'pending' or state == 'sharding' or (state == 'ready' and ARGV[3] ~= '1') then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'pending', 'progress', '0', 'reason', '', 'source', ARGV[1],
           'updated', ARGV[2])
return 1
"""


def shard_dir(model_id: str) -> Path:
    """The shard folder of ``model_id`` under ``AZU_REGISTRY_DIR`` ("org/name" -> "org--name")."""
    return get_settings().registry_dir / validate_model_id(model_id).replace("/", "--")


def registry_file_url(base_url: str, model_id: str, name: str) -> str:
    """Where the registry serves one file of a shard folder (manifest.json included)."""
    return f"{base_url.rstrip('/')}/models/files/{quote(name)}?model_id={quote(model_id, safe='')}"


# --- status -------------------------------------------------------------------------------------
def model_status(r: redis.Redis, model_id: str) -> dict[str, Any]:
    """{"model_id", "state", "progress", "reason"}; NotFound if the model was never asked for."""
    return _status_of(model_id, _model_record(r, model_id))


def _model_record(r: redis.Redis, model_id: str) -> dict[str, str]:
    """The model's hash as text; NotFound if the model was never asked for."""
    raw = {keys.as_str(k): keys.as_str(v) for k, v in r.hgetall(keys.model(model_id)).items()}
    if not raw:
        if (shard_dir(model_id) / MANIFEST_NAME).is_file():
            mark_ready(r, model_id, source=model_id)  # sharded before Redis was (re)started
            return _model_record(r, model_id)
        raise NotFound(f"model {model_id!r} is not in the registry (POST /models/shard first)",
                       param="model_id")
    return raw


def _status_of(model_id: str, raw: dict[str, str]) -> dict[str, Any]:
    return {"model_id": model_id, "state": raw.get("state", "pending"),
            "progress": float(raw.get("progress") or 0.0), "reason": raw.get("reason") or None}


def ready_models(r: redis.Redis) -> list[str]:
    ids = {keys.as_str(m) for m in r.smembers(keys.READY_MODELS)}
    root = get_settings().registry_dir
    if root.is_dir():
        for d in root.iterdir():
            if (d / MANIFEST_NAME).is_file():
                ids.add(d.name.replace("--", "/"))
    return sorted(ids)


class ShardQuotaExceeded(AzuError):
    """The account started its AZU_SHARD_QUOTA shard requests today (UTC)."""

    status = 429
    code = "shard_quota_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, param="model_id")
        self.retry_after = retry_after


def _quota_key(account: str, day: str) -> str:
    digest = hashlib.sha256(account.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"azu:shard-quota:{digest}:{day}"


def _take_quota(r: redis.Redis, account: str, quota: int) -> str:
    """Count one shard request of ``account`` today (ShardQuotaExceeded past ``quota``); the counter's key."""
    now = datetime.now(UTC)
    key = _quota_key(account, now.strftime("%Y%m%d"))
    pipe = r.pipeline()
    pipe.incr(key)
    pipe.expire(key, 2 * 86400)
    used, _ = pipe.execute()
    if int(used) > quota:
        r.decr(key)
        tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        raise ShardQuotaExceeded(f"this account already started its {quota} shard requests today "
                                 "(AZU_SHARD_QUOTA); try again tomorrow (UTC)",
                                 retry_after=max(1, int((tomorrow - now).total_seconds())))
    return key


def request_shard(r: redis.Redis, model_id: str, *, source: str | None = None,
                  dispatch: Dispatcher | None = None, account: str | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """Enqueue sharding of ``model_id`` once (from ``source``: a hub id or an allowed local folder).

    What an API request may start (``account``: the authenticated caller) is bounded: the checkpoint's
    weights are at most AZU_MAX_SHARD_BYTES, read from the hub listing (or the folder) before anything is
    downloaded; an account starts at most AZU_SHARD_QUOTA shardings a day; and a ready model is never
    replaced (Conflict) unless the operator allows it (AZU_ALLOW_RESHARD). Asking again for a model that is
    ready from the same source, or already on its way, changes nothing and answers its status.
    """
    settings = settings or get_settings()
    model_id, source = resolve_request(model_id, source)
    key = keys.model(model_id)
    if (shard_dir(model_id) / MANIFEST_NAME).is_file() and not r.exists(key):
        mark_ready(r, model_id, source=source)
    state, current_source = (keys.as_str(v or b"") for v in r.hmget(key, "state", "source"))
    if state in ("pending", "sharding"):
        return model_status(r, model_id)
    if state == "ready" and not settings.api.allow_reshard:
        if current_source == source:
            return model_status(r, model_id)
        raise Conflict(f"model {model_id!r} is ready (sharded from {current_source}); a shard request cannot "
                       "replace it (the operator may allow that with AZU_ALLOW_RESHARD=1)", param="model_id")
    check_size(source, max_bytes=settings.api.max_shard_bytes)
    quota_key = _take_quota(r, account, settings.api.shard_quota) if account is not None else None
    claimed = r.eval(_CLAIM, 1, key, source, str(time.time()), "1" if settings.api.allow_reshard else "0")
    if claimed:
        send_shard(model_id, source, dispatch=dispatch)
    elif quota_key is not None:
        r.decr(quota_key)  # another request claimed it first: this one started nothing
    return model_status(r, model_id)


def set_progress(r: redis.Redis, model_id: str, progress: float) -> None:
    r.hset(keys.model(model_id), mapping={"progress": f"{max(0.0, min(1.0, progress)):.3f}",
                                         "updated": str(time.time())})


def run_shard(r: redis.Redis, model_id: str, source: str) -> dict[str, Any]:
    """Shard ``source`` into ``shard_dir(model_id)``; the status records success or the reason it failed."""
    key = keys.model(model_id)
    if keys.as_str(r.hget(key, "state") or b"") == "ready":
        return model_status(r, model_id)  # a redelivered task: the work is done
    r.hset(key, mapping={"state": "sharding", "progress": "0", "reason": "", "updated": str(time.time())})
    out = shard_dir(model_id)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        if is_local_source(source):
            check_local_source(source)  # again here: the task may come from anywhere on the queue
        check_size(source, max_bytes=get_settings().api.max_shard_bytes)  # before any download
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shard_model(source, tmp, progress=False)  # hub token and endpoint: from the settings
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
    pipe.hset(keys.model(model_id), mapping={"state": "ready", "progress": "1", "reason": "",
                                             "source": source, "info": info.to_json(),
                                             "updated": str(time.time())})
    pipe.sadd(keys.READY_MODELS, model_id)
    pipe.execute()
    return info


def model_info(r: redis.Redis, model_id: str) -> ModelInfo:
    """Routing facts of a ready model; NotFound if unknown, NoCapacity while it is still being sharded."""
    status, info = status_and_info(r, model_id)  # one round trip: a job's first token waits for it
    if info is None:
        if status["state"] == "failed":
            raise NotFound(f"model {model_id!r} failed to shard: {status['reason']}", param="model")
        raise NoCapacity(f"model {model_id!r} is not ready yet ({status['state']})", param="model")
    return info


def status_and_info(r: redis.Redis, model_id: str) -> tuple[dict[str, Any], ModelInfo | None]:
    """``model_status`` and, if the model is ready, its routing facts, from one read of its record (the API
    wants both for every request); NotFound if the model was never asked for."""
    record = _model_record(r, model_id)
    status = _status_of(model_id, record)
    if status["state"] != "ready":
        return status, None
    if record.get("info"):
        return status, ModelInfo.from_json(record["info"])
    return status, mark_ready(r, model_id, source=model_id)
