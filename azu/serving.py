"""Serving a job, framework-free: a ready model's tokenizer and facts, the context check, starting a job
(hold, then submit; the hold is given back when the submit fails), following its events, cancelling it.

The web routes (web/jobs.py, web/openai.py) parse a request, call these and shape the answer, as vLLM's
OpenAI entrypoint splits api_server / protocol / serving. Everything a function needs (a Redis client, the
billing, the settings) is an argument: nothing here knows about Flask.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from azu.billing.base import Billing
from azu.billing.economics import max_token_layers
from azu.config import Settings, get_settings
from azu.errors import Conflict, InvalidRequest, JobFailed, JobTimeout, NotFound
from azu.network import jobs as jobs_api
from azu.registry import sources
from azu.registry import status as shard_status
from azu.registry.download import DownloadFailed, fetch_bytes
from azu.registry.status import ModelInfo
from azu.tokenization import ModelTokenizer, StreamDecoder, load_tokenizer

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # one XREAD waits at most this long, so a dead client is noticed within a second or so
BROKER_GRACE_S = 60.0  # a stream waits this long for a restarting Redis before it ends with an error event
BROKER_RETRY_S = 0.5
REGISTRY_FETCH_TIMEOUT_S = 30.0


# --- models ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadyModel:
    model_id: str
    folder: Path
    tokenizer: ModelTokenizer
    num_layers: int
    context_length: int | None
    # Its routing facts as read here, handed to the job's submission (which would read them again).
    info: ModelInfo | None = None


def ready_model(r: redis.Redis, model_id: str, *, param: str = "model",
                settings: Settings | None = None) -> ReadyModel:
    """The model if it is sharded and ready; NotFound if unknown, Conflict while it is still being sharded."""
    info: ModelInfo | None = None
    try:
        sources.validate_model_id(model_id)
        status, info = shard_status.status_and_info(r, model_id)  # one round trip
    except (NotFound, InvalidRequest):
        status = {}
    state = status.get("state")
    if info is not None:
        folder = tokenizer_folder(model_id, settings=settings)
        return ReadyModel(model_id=model_id, folder=folder, tokenizer=load_tokenizer(folder),
                          num_layers=info.num_layers, context_length=info.context_length, info=info)
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


def tokenizer_folder(model_id: str, *, settings: Settings | None = None) -> Path:
    """Where the model's tokenizer files are on this machine.

    The shard folder when this process shares the registry's disk (azu-core, azu up); otherwise the files
    are fetched once from the registry (REGISTRY_URL) into a local cache (AZU_CACHE_DIR), each checked
    against the manifest's SHA-256.
    """
    settings = settings or get_settings()
    folder = Path(shard_status.shard_dir(model_id))
    if (folder / "tokenizer.json").is_file():
        return folder
    cache = Path(settings.cache_dir or Path.home() / ".cache" / "azu") / "tokenizers"
    local = cache / folder.name
    if (local / "tokenizer.json").is_file():
        return local
    return _fetch_tokenizer(model_id, local, registry_url=settings.registry_url)


def _fetch_tokenizer(model_id: str, dest: Path, *, registry_url: str) -> Path:
    def get(name: str, sha256: str | None = None) -> bytes:
        try:
            return fetch_bytes(shard_status.registry_file_url(registry_url, model_id, name), sha256=sha256,
                               timeout=REGISTRY_FETCH_TIMEOUT_S)
        except DownloadFailed as exc:
            raise NotFound(f"the registry at {registry_url} has no {name} for {model_id} ({exc.message})") \
                from None

    manifest = json.loads(get("manifest.json"))
    listed = {e["name"]: e["sha256"] for e in manifest.get("extra_files", [])}
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private folder per fetch: gunicorn threads may fetch the same model at once.
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp-"))
    try:
        for name in TOKENIZER_FILES:
            if name in listed:
                (tmp / name).write_bytes(get(name, listed[name]))
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
    """The token budget; InvalidRequest when the prompt (plus what it may generate) exceeds the context."""
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


def start_job(r: redis.Redis, billing: Billing, model: ReadyModel, *, user_id: str, prompt_ids: list[int],
              max_tokens: int, sampling: Sampling) -> str:
    """Hold the most the job can cost, then submit it. A failed submit gives the hold back."""
    job_id = new_job_id()
    billing.hold(user_id=user_id, job_id=job_id, model_id=model.model_id,
                 max_token_layers=max_token_layers(len(prompt_ids), max_tokens, model.num_layers))
    req = jobs_api.JobRequest(job_id=job_id, user_id=user_id, model_id=model.model_id, prompt_ids=prompt_ids,
                              max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=max(sampling.top_k, 0), seed=sampling.seed, stop=list(sampling.stop))
    try:
        jobs_api.submit_job(r, req, info=model.info)
    except BaseException:
        billing.release(job_id=job_id)
        raise
    return job_id


def own_job(r: redis.Redis, job_id: str, user_id: str) -> jobs_api.JobView:
    """The job's view if it exists and belongs to ``user_id``; another user's job is reported as unknown."""
    view = jobs_api.get_job(r, job_id)
    if view is None or view.user_id != user_id:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return view


def job_stop_strings(view: jobs_api.JobView) -> list[str]:
    """The stop strings the job was submitted with (to cut the text the way the stream cut it)."""
    return [s for s in view.stop if isinstance(s, str) and s]


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


def follow(r: redis.Redis, job_id: str, *, deadline: float) -> Iterator[jobs_api.JobEvent | None]:
    """The job's events in order, until done/error or the deadline (then one synthetic timeout event).

    ``None`` between events is a heartbeat: it lets a streaming caller notice a client that went away.
    Redis going away mid-stream (a restart) is waited out for ``BROKER_GRACE_S`` while heartbeats go on: the
    job carries on once Redis is back (its events are in the AOF) and so does the stream. Past the grace, one
    error event says so, and where the answer can still be read.
    """
    last_id = "0-0"
    lost_since: float | None = None
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            yield jobs_api.JobEvent(kind="error", token_id=None, finish_reason=None, usage=None,
                                    error="timeout")
            return
        try:
            last_id, events = jobs_api.read_events(r, job_id, last_id=last_id,
                                                   block_ms=min(READ_BLOCK_MS, remaining_ms))
            lost_since = None
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            now = time.monotonic()
            lost_since = lost_since or now
            if now - lost_since > BROKER_GRACE_S:
                yield jobs_api.JobEvent(kind="error", token_id=None, finish_reason=None, usage=None,
                                        error=f"the broker is unavailable; job {job_id} may still finish: "
                                        f"GET /results/{job_id} later")
                return
            yield None
            time.sleep(BROKER_RETRY_S)  # Redis is restarting: ask again shortly
            continue
        if not events:
            yield None
            continue
        for event in events:
            yield event
            if event.kind in ("done", "error"):
                return


def wait_for(r: redis.Redis, job_id: str, *, timeout_s: float) -> Outcome:
    """Block until the job ends (or ``timeout_s`` passes), cancelling it on timeout."""
    outcome = Outcome()
    for event in follow(r, job_id, deadline=time.monotonic() + timeout_s):
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
        cancel_quietly(r, job_id)
    return outcome


def raise_for(outcome: Outcome, job_id: str, *, timeout_s: float) -> None:
    """JobTimeout or JobFailed when the job did not end well."""
    if outcome.timed_out:
        raise JobTimeout(f"job {job_id} did not finish within {timeout_s:.0f} s; it was cancelled")
    if outcome.error is not None:
        raise JobFailed(f"job {job_id} failed: {outcome.error}")


def cancel_quietly(r: redis.Redis, job_id: str) -> None:
    try:
        jobs_api.cancel_job(r, job_id)
    except Exception:  # best effort: the caller is already answering (or gone)
        log.warning("could not cancel job %s", job_id, exc_info=True)


def decoder(model: ReadyModel, sampling: Sampling) -> StreamDecoder:
    return model.tokenizer.stream_decoder(stop=sampling.stop)
