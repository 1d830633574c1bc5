"""What the job routes share: the Redis client, the billing seam, the caller's identity, a ready model's
tokenizer, and turning a validated request into a job (hold, then enqueue) and its events into answers.

Routes (web/jobs.py, web/openai.py) parse and shape; protocol (web/schemas.py) validates; this module does
the work in between, as vLLM's OpenAI entrypoint splits api_server / protocol / serving.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from flask import current_app, request

from azu.billing import base as billing_mod
from azu.errors import AzuError, Conflict, InvalidRequest, NotFound
from azu.network import jobs as jobs_api
from azu.registry import status as models_api
from azu.tokenization import ModelTokenizer, StreamDecoder, load_tokenizer

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # one XREAD waits at most this long, so a dead client is noticed within a second or so


def request_timeout_s() -> float:
    """How long a request waits for its job before giving up (AZU_REQUEST_TIMEOUT_S, default 600)."""
    return float(current_app.config.get("AZU_REQUEST_TIMEOUT_S") or os.environ.get("AZU_REQUEST_TIMEOUT_S")
                 or 600)


# --- shared clients, one per app ---------------------------------------------------------------------------
def redis_client() -> redis.Redis:
    ext = current_app.extensions
    client = ext.get("azu.redis")
    if client is None:
        from azu.config import redis_url

        url = current_app.config.get("REDIS_URL") or redis_url()
        client = ext["azu.redis"] = redis.Redis.from_url(url)
    return client


def billing() -> billing_mod.Billing:
    ext = current_app.extensions
    if "azu.billing.base" not in ext:
        chosen = current_app.config.get("AZU_BILLING")
        if chosen is None:
            get_billing = getattr(billing_mod, "get_billing", None)
            chosen = get_billing() if get_billing else billing_mod.FreeBilling()
        ext["azu.billing.base"] = chosen
    return ext["azu.billing.base"]


def api_key() -> str | None:
    """The caller's key: ``Authorization: Bearer <key>`` (what the openai client sends) or ``X-API-Key``."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def current_user() -> str:
    """The authenticated user id (billing raises Unauthorized, a 401, for an unknown or revoked key)."""
    return billing().authenticate(api_key())


# --- models ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadyModel:
    model_id: str
    folder: Path
    tokenizer: ModelTokenizer
    num_layers: int
    context_length: int | None


def ready_model(model_id: str, *, param: str = "model") -> ReadyModel:
    """The model if it is sharded and ready; 404 if unknown, 409 while it is still being sharded."""
    r = redis_client()
    try:
        models_api.validate_model_id(model_id)
        status = models_api.model_status(r, model_id)
    except (NotFound, InvalidRequest):
        status = {}
    state = status.get("state")
    if state == "ready":
        info = models_api.model_info(r, model_id)
        folder = tokenizer_folder(model_id)
        return ReadyModel(model_id=model_id, folder=folder, tokenizer=load_tokenizer(folder),
                          num_layers=info.num_layers, context_length=info.context_length)
    if state in ("pending", "sharding"):
        progress = status.get("progress")
        done = f" ({round(100 * float(progress))}% done)" if isinstance(progress, int | float) else ""
        raise Conflict(f"model {model_id!r} is not ready yet: {state}{done}; poll "
                       f"/models/status?model_id={model_id}", param=param)
    if state == "failed":
        raise Conflict(f"model {model_id!r} failed to shard: {status.get('reason') or 'unknown reason'}",
                       param=param)
    raise NotFound(f"model {model_id!r} is not known here; shard it first with POST /models/shard",
                   param=param)


# Files a tokenizer may need; the registry lists whichever of them the model has in its manifest.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")


def tokenizer_folder(model_id: str) -> Path:
    """Where the model's tokenizer files are on this machine.

    The shard folder when this process shares the registry's disk (azu-core, azu up); otherwise the files
    are fetched once from REGISTRY_URL into a local cache, each checked against the manifest's SHA-256.
    """
    folder = Path(models_api.shard_dir(model_id))
    if (folder / "tokenizer.json").is_file():
        return folder
    cache = Path(os.environ.get("AZU_CACHE_DIR") or Path.home() / ".cache" / "azu") / "tokenizers"
    local = cache / folder.name
    if (local / "tokenizer.json").is_file():
        return local
    return _fetch_tokenizer(model_id, local)


def _fetch_tokenizer(model_id: str, dest: Path) -> Path:
    import hashlib
    import json
    import shutil
    import tempfile

    import requests

    from azu.config import get_settings

    base = get_settings().registry_url

    def get(name: str) -> bytes:
        resp = requests.get(models_api.registry_file_url(base, model_id, name), timeout=30)
        if resp.status_code != 200:
            raise NotFound(f"the registry at {base} has no {name} for {model_id} ({resp.status_code})")
        return resp.content

    manifest = json.loads(get("manifest.json"))
    listed = {e["name"]: e["sha256"] for e in manifest.get("extra_files", [])}
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private folder per fetch: gunicorn threads may fetch the same model at once.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp-"))
    try:
        for name in TOKENIZER_FILES:
            if name not in listed:
                continue
            data = get(name)
            if hashlib.sha256(data).hexdigest() != listed[name]:
                from azu.errors import IntegrityFailure

                raise IntegrityFailure(f"{name} of {model_id} from the registry does not match its manifest")
            (tmp / name).write_bytes(data)
        if (dest / "tokenizer.json").is_file():
            return dest  # another thread finished first
        shutil.rmtree(dest, ignore_errors=True)  # a stale, incomplete copy
        try:
            os.replace(tmp, dest)  # a concurrent reader never sees half a tokenizer
        except OSError:
            if not (dest / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- jobs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] = field(default_factory=list)


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


def check_context(model: ReadyModel, prompt_ids: list[int], max_tokens: int | None, *,
                  prompt_param: str, default_max_tokens: int) -> int:
    """The token budget; a 400 when the prompt (plus what it asks to generate) exceeds the context."""
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty after tokenization", param=prompt_param)
    ctx = model.context_length
    if ctx is not None and n >= ctx:
        raise InvalidRequest(f"the prompt is {n} tokens; {model.model_id} has a context of {ctx} tokens, "
                             "leaving no room to generate", param=prompt_param)
    if max_tokens is None:
        max_tokens = default_max_tokens if ctx is None else min(default_max_tokens, ctx - n)
    elif ctx is not None and n + max_tokens > ctx:
        raise InvalidRequest(f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"{model.model_id}'s context of {ctx} tokens; ask for at most {ctx - n}",
                             param="max_tokens")
    return max_tokens


def start_job(model: ReadyModel, *, user_id: str, prompt_ids: list[int], max_tokens: int,
              sampling: Sampling) -> str:
    """Hold the most the job can cost, then enqueue it. A failed enqueue gives the hold back."""
    job_id = new_job_id()
    # Every prompt token and every generated token passes through every layer at most once.
    max_token_layers = (len(prompt_ids) + max_tokens) * model.num_layers
    pay = billing()
    pay.hold(user_id=user_id, job_id=job_id, model_id=model.model_id, max_token_layers=max_token_layers)
    req = jobs_api.JobRequest(job_id=job_id, user_id=user_id, model_id=model.model_id, prompt_ids=prompt_ids,
                              max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=max(sampling.top_k, 0), seed=sampling.seed, stop=list(sampling.stop))
    try:
        jobs_api.submit_job(redis_client(), req)
    except BaseException:
        pay.release(job_id=job_id)
        raise
    return job_id


def own_job(job_id: str, user_id: str) -> Any:
    """The job's view if it exists and belongs to ``user_id``; another user's job is reported as unknown."""
    view = jobs_api.get_job(redis_client(), job_id)
    if view is None or view.user_id != user_id:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return view


def job_stop_strings(view: Any) -> list[str]:
    """The stop strings the job was submitted with (to cut the text the way the stream cut it)."""
    stop = getattr(view, "stop", None)
    if stop is None:
        # JobView does not carry them (yet): read the sampling settings azu.network.jobs stored with the job.
        import json

        raw = redis_client().hget(jobs_api.job_key(view.job_id), "gen")
        stop = json.loads(raw).get("stop", []) if raw else []
    return [s for s in stop if isinstance(s, str) and s]


def usage_dict(usage: dict[str, Any] | None, *, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """OpenAI's usage fields plus azu's token-layers (total and per worker)."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens", prompt_tokens))
    completion = int(usage.get("completion_tokens", completion_tokens))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "token_layers": int(usage.get("token_layers", 0)),
            "workers": {str(k): int(v) for k, v in (usage.get("workers") or {}).items()}}


@dataclass
class Outcome:
    """How a job ended, read from its event stream."""

    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    timed_out: bool = False


class JobFailed(AzuError):
    """The pipeline gave up on a job (e.g. a stage raised); the reason comes from the worker."""

    status = 502
    code = "job_failed"


class JobTimeout(AzuError):
    status = 504
    code = "timeout"


def follow(job_id: str, *, deadline: float) -> Iterator[Any]:
    """The job's events in order, until done/error or the deadline (then one synthetic timeout event)."""
    r = redis_client()
    last_id = "0-0"
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            yield jobs_api.JobEvent(kind="error", token_id=None, finish_reason=None, usage=None,
                                    error="timeout")
            return
        last_id, events = jobs_api.read_events(r, job_id, last_id=last_id,
                                               block_ms=min(READ_BLOCK_MS, remaining_ms))
        if not events:
            yield None  # a heartbeat: lets a streaming caller notice a client that went away
            continue
        for event in events:
            yield event
            if event.kind in ("done", "error"):
                return


def wait_for(job_id: str) -> Outcome:
    """Block until the job ends (or the request timeout), cancelling it on timeout."""
    outcome = Outcome()
    for event in follow(job_id, deadline=time.monotonic() + request_timeout_s()):
        if event is None:
            continue
        if event.kind == "token" and event.token_id is not None:
            outcome.token_ids.append(int(event.token_id))
        elif event.kind == "done":
            outcome.finish_reason, outcome.usage = event.finish_reason, event.usage
        elif event.kind == "error":
            outcome.error = event.error or "the job failed"
            outcome.timed_out = event.error == "timeout" and outcome.finish_reason is None
    if outcome.timed_out:
        cancel_quietly(job_id)
    return outcome


def raise_for(outcome: Outcome, job_id: str) -> None:
    if outcome.timed_out:
        raise JobTimeout(f"job {job_id} did not finish within {request_timeout_s():.0f} s; it was cancelled")
    if outcome.error is not None:
        raise JobFailed(f"job {job_id} failed: {outcome.error}")


def cancel_quietly(job_id: str) -> None:
    try:
        jobs_api.cancel_job(redis_client(), job_id)
    except Exception:  # best effort: the caller is already answering (or gone)
        log.warning("could not cancel job %s", job_id, exc_info=True)


def decoder(model: ReadyModel, sampling: Sampling) -> StreamDecoder:
    return model.tokenizer.stream_decoder(stop=sampling.stop)
