"""The job lifecycle: submit, start, send on, finish, fail, cancel, read, and bill once ended.

Framework-free; every function takes a ``redis.Redis``. A job's Redis keys (azu.network.keys) expire a day
after its last change; nothing here must survive a restart. Its events stream has one entry per step with id
``0-<step+1>``: explicit ids make publishing idempotent (a replayed step's XADD is refused because its id is
not greater than the last one).

Steps travel as ``StepPayload``s (azu.network.wire) through the workers' inboxes (azu.network.inbox); the
worker side is azu.network.node, the watchdog azu.network.watchdog.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from azu.billing.base import Billing
from azu.config import get_settings
from azu.errors import Conflict, InvalidRequest, NoCapacity
from azu.network import directory, inbox, keys, placement
from azu.network.auth import job_token
from azu.network.dispatch import Dispatcher, get_dispatcher, send_end_job, send_load, send_settle
from azu.network.wire import Hop, Sampling, StepPayload, route_from_list
from azu.registry.status import ModelInfo, model_info

log = logging.getLogger(__name__)

# What one request may ask for. The API's schemas (web/schemas.py) read these; so does _validate below, for
# callers that skip the API (benchmarks, the scheduler). OpenAI's bounds where OpenAI has one.
MAX_TOKENS = 1_000_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


def _hash(r: redis.Redis, job_id: str) -> dict[str, str]:
    """The job's record as text (empty if unknown or expired)."""
    raw: dict[Any, Any] = r.hgetall(keys.job(job_id))  # type: ignore[assignment]
    return {keys.as_str(k): keys.as_str(v) for k, v in raw.items()}


# --- the request --------------------------------------------------------------------------------
@dataclass
class JobRequest:
    job_id: str
    user_id: str
    model_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the last stage checks them)
    stop_token_ids: list[int] | None = None  # default: the model's eos ids


@dataclass
class JobEvent:
    kind: str  # "token" | "done" | "error"
    token_id: int | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class JobView:
    job_id: str
    status: str  # queued | running | done | failed
    user_id: str
    model_id: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: str | None
    prompt_tokens: int
    created_at: float
    stop: list[str] = field(default_factory=list)  # the job's stop strings (the API trims the text at them)


def _validate(req: JobRequest, info: ModelInfo) -> None:
    if not req.job_id or not isinstance(req.job_id, str) or len(req.job_id) > 128 or ":" in req.job_id:
        raise InvalidRequest("job_id must be a non-empty string of at most 128 characters without ':'")
    ids = req.prompt_ids
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequest("the prompt must be a non-empty list of token ids", param="prompt")
    if min(ids) < 0 or max(ids) >= info.vocab_size:
        raise InvalidRequest(f"token ids must be in [0, {info.vocab_size})", param="prompt")
    if not isinstance(req.max_tokens, int) or not 1 <= req.max_tokens <= MAX_TOKENS:
        raise InvalidRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS}]", param="max_tokens")
    if info.context_length and len(ids) + req.max_tokens > info.context_length:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                             f"model's context of {info.context_length} tokens", param="max_tokens")
    if not 0.0 <= float(req.temperature) <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be between 0 and {MAX_TEMPERATURE:g}", param="temperature")
    if not 0.0 < float(req.top_p) <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if not isinstance(req.top_k, int) or not 0 <= req.top_k <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be an integer in [0, {MAX_TOP_K}]", param="top_k")
    if req.seed is not None and (not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED):
        raise InvalidRequest("seed must be a non-negative 63-bit integer", param="seed")
    if (not isinstance(req.stop, list) or len(req.stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) for s in req.stop)):
        raise InvalidRequest(f"stop must be a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    if req.stop_token_ids is not None and not all(isinstance(t, int) for t in req.stop_token_ids):
        raise InvalidRequest("stop_token_ids must be token ids", param="stop_token_ids")


# --- submitting and starting --------------------------------------------------------------------
def submit_job(r: redis.Redis, req: JobRequest, *, dispatch: Dispatcher | None = None) -> None:
    """Route the job (or order the loads it needs), store it and enqueue its first step.

    Raises NotFound (unknown model), NoCapacity (model still sharding; no live worker can hold it),
    InvalidRequest (bad parameters), Conflict (job id already used).
    """
    info = model_info(r, req.model_id)
    _validate(req, info)
    dispatch = dispatch or get_dispatcher()
    workers = directory.live_workers(r)
    routes = placement.find_routes(req.model_id, info.num_layers, workers)
    loading = r.exists(keys.loading(req.model_id))
    if not routes and not loading and not placement.plan_loads(info.shape, workers):
        need = placement.needed_bytes(info.shape)
        raise NoCapacity(f"no live worker holds {req.model_id} and the {len(workers)} live worker(s) "
                         f"cannot load it (it needs about {need} bytes)", param="model")
    sampling = Sampling(
        max_tokens=req.max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
        top_k=int(req.top_k), seed=req.seed if req.seed is not None else secrets.randbits(62),
        stop=tuple(req.stop),
        stop_ids=tuple(req.stop_token_ids if req.stop_token_ids is not None else info.eos_token_ids),
        prompt_len=len(req.prompt_ids))
    now = time.time()
    key = keys.job(req.job_id)
    if not r.hsetnx(key, "status", "queued"):
        raise Conflict(f"job id {req.job_id} is already in use")
    pipe = r.pipeline()
    pipe.hset(key, mapping={
        "user_id": req.user_id, "model_id": req.model_id, "prompt_ids": json.dumps(req.prompt_ids),
        "gen": json.dumps(sampling.to_dict()), "created": str(now), "updated": str(now), "step": "0",
    })
    pipe.expire(key, keys.JOB_TTL_S)
    pipe.zadd(keys.ACTIVE_JOBS, {req.job_id: now})
    pipe.execute()
    if routes:
        route = placement.choose_route(routes, int(r.incr(keys.turn(req.model_id))))
        assert route is not None
        start_job(r, req.job_id, route, dispatch=dispatch)
        return
    r.zadd(keys.waiting(req.model_id), {req.job_id: now})
    orders = ensure_placed(r, req.model_id, dispatch=dispatch)
    log.info("job %s waits for %s (%d new load order(s))", req.job_id, req.model_id, len(orders))
    # Loads may have finished between the route check and the waiting list: try once more now.
    start_waiting_jobs(r, req.model_id, dispatch=dispatch)


def ensure_placed(r: redis.Redis, model_id: str, *,
                  dispatch: Dispatcher | None = None) -> list[placement.LoadOrder]:
    """Send load orders if no live worker chain serves ``model_id`` and none are in flight. Returns them."""
    info = model_info(r, model_id)
    workers = directory.live_workers(r)
    if placement.find_routes(model_id, info.num_layers, workers) or r.exists(keys.loading(model_id)):
        return []
    orders = placement.plan_loads(info.shape, workers)
    # One set of orders in flight per model (NX), until the route is complete or the deadline passes.
    if not orders or not r.set(keys.loading(model_id), json.dumps([o.to_dict() for o in orders]), nx=True,
                               ex=int(get_settings().load_deadline_s)):
        return []
    dispatch = dispatch or get_dispatcher()
    manifest_sha = _manifest_sha256(model_id)
    for order in orders:
        send_load(order.worker_id, order.model_id, order.span, manifest_sha256=manifest_sha,
                  dispatch=dispatch)
    return orders


def _manifest_sha256(model_id: str) -> str | None:
    """The manifest's hash as the registry has it (so a worker can check what it downloads), if local."""
    import hashlib

    from azu.registry.status import shard_dir

    path = shard_dir(model_id) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def start_job(r: redis.Redis, job_id: str, route: list[Hop], *, dispatch: Dispatcher) -> None:
    """Sign the route and send the prompt (step 0) to the first hop."""
    job = _hash(r, job_id)
    model_id = job["model_id"]
    token = job_token(job_id, model_id, route)
    route_json = json.dumps([h.to_list() for h in route])
    r.hset(keys.job(job_id), mapping={"status": "running", "route": route_json, "updated": str(time.time())})
    first = StepPayload(job_id=job_id, model_id=model_id, route=tuple(route), token=token,
                        sampling=Sampling.from_dict(json.loads(job["gen"])), step=0, hop=0, pos=0,
                        x=json.loads(job["prompt_ids"]))
    send_steps(r, [first], dispatch=dispatch)


def send_steps(r: redis.Redis, steps: Sequence[StepPayload], *, dispatch: Dispatcher,
               usage: Sequence[tuple[str, str, int]] = ()) -> None:
    """Send steps on, each to the worker of its hop: one Redis round trip (plus ``usage`` (job, worker,
    token-layers) counted in it), then one Celery message per worker that was idle. Never waits."""
    if not steps and not usage:
        return
    by_worker: dict[str, list[bytes]] = {}
    for step in steps:
        by_worker.setdefault(step.here.worker_id, []).append(step.pack())
    pipe = r.pipeline(transaction=False)
    for job_id, worker_id, amount in usage:
        pipe.hincrby(keys.usage(job_id), worker_id, amount)
    inbox.deliver(pipe, by_worker, dispatch=dispatch)


def start_waiting_jobs(r: redis.Redis, model_id: str, *, dispatch: Dispatcher | None = None) -> int:
    """Start the jobs waiting for ``model_id`` if live workers now hold a complete route. Returns how many.

    Under a per-model lock: two workers finishing their loads at once must not both miss the route
    (each seeing only its own part) nor both start the same job.
    """
    if not r.zcard(keys.waiting(model_id)):
        return 0
    dispatch = dispatch or get_dispatcher()
    started = 0
    with r.lock(keys.start_lock(model_id), timeout=30, blocking_timeout=30):
        info = model_info(r, model_id)
        routes = placement.find_routes(model_id, info.num_layers, directory.live_workers(r))
        if not routes:
            return 0
        r.delete(keys.loading(model_id))
        for raw in r.zrange(keys.waiting(model_id), 0, -1):
            job_id = keys.as_str(raw)
            if not r.zrem(keys.waiting(model_id), job_id):
                continue
            if keys.as_str(r.hget(keys.job(job_id), "status") or b"") != "queued":
                continue  # cancelled or failed while waiting
            route = placement.choose_route(routes, int(r.incr(keys.turn(model_id))))
            assert route is not None
            start_job(r, job_id, route, dispatch=dispatch)
            started += 1
    return started


def fail_waiting_jobs(r: redis.Redis, model_id: str, reason: str, *,
                      dispatch: Dispatcher | None = None) -> int:
    dispatch = dispatch or get_dispatcher()
    r.delete(keys.loading(model_id))
    n = 0
    for raw in r.zrange(keys.waiting(model_id), 0, -1):
        job_id = keys.as_str(raw)
        if r.zrem(keys.waiting(model_id), job_id):
            fail_job(r, job_id, reason, dispatch=dispatch)
            n += 1
    return n


# --- finishing ----------------------------------------------------------------------------------
def usage_of(r: redis.Redis, job_id: str, *, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The job's usage as the clients see it, from the token-layers its workers counted so far."""
    raw: dict[Any, Any] = r.hgetall(keys.usage(job_id))  # type: ignore[assignment]
    return usage_record(raw, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def usage_record(workers_raw: dict[Any, Any], *, prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
    """Usage from a job's usage hash as Redis answered it (worker id -> token-layers)."""
    workers = {keys.as_str(k): int(v) for k, v in workers_raw.items()}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "token_layers": sum(workers.values()), "workers": workers}


def _end_caches(job_id: str, model_id: str, route: Sequence[Hop], token: str, *, skip: str | None,
                dispatch: Dispatcher) -> None:
    for worker_id in sorted({h.worker_id for h in route} - {skip}):
        send_end_job(worker_id, job_id=job_id, model_id=model_id, route=route, token=token, dispatch=dispatch)


def _close(pipe: Any, job_id: str, fields: dict[str, str]) -> None:
    """The end-of-job write every ending shares: final fields, off the active list, keys expire."""
    now = str(time.time())
    pipe.hset(keys.job(job_id), mapping={**fields, "updated": now, "finished": now})
    pipe.zrem(keys.ACTIVE_JOBS, job_id)
    for k in (keys.job(job_id), keys.events(job_id), keys.usage(job_id)):
        pipe.expire(k, keys.JOB_TTL_S)


def finish_job(r: redis.Redis, job_id: str, *, model_id: str, route: Sequence[Hop], token: str, reason: str,
               usage: dict[str, Any], last_worker: str, dispatch: Dispatcher) -> None:
    """Record a finished job (the done event is already published), bill it, free the other caches."""
    pipe = r.pipeline()
    _close(pipe, job_id, {"status": "done", "finish_reason": reason, "usage": json.dumps(usage)})
    pipe.execute()
    send_settle(job_id, dispatch=dispatch)
    _end_caches(job_id, model_id, route, token, skip=last_worker, dispatch=dispatch)


def fail_job(r: redis.Redis, job_id: str, reason: str, *, dispatch: Dispatcher | None = None) -> bool:
    """Mark the job failed with ``reason`` (once), tell the client, bill it, free the caches."""
    dispatch = dispatch or get_dispatcher()
    key = keys.job(job_id)
    job = _hash(r, job_id)
    if not job or job.get("status") in ("done", "failed"):
        return False
    # Claim the transition: only one of (watchdog, stage, cancel) records the failure.
    if not r.hsetnx(key, "failed_claim", "1"):
        return False
    prompt_len = int(json.loads(job.get("gen") or "{}").get("prompt_len", 0))
    done_steps = int(job.get("step") or 0)
    usage = usage_of(r, job_id, prompt_tokens=prompt_len, completion_tokens=done_steps)
    pipe = r.pipeline()
    pipe.xadd(keys.events(job_id), {"k": "error", "error": reason}, id="0-*")
    _close(pipe, job_id, {"status": "failed", "error": reason, "finish_reason": "error",
                          "usage": json.dumps(usage)})
    pipe.execute()
    send_settle(job_id, dispatch=dispatch)
    if job.get("route"):
        route = route_from_list(json.loads(job["route"]))
        token = job_token(job_id, job["model_id"], route)
        _end_caches(job_id, job["model_id"], route, token, skip=None, dispatch=dispatch)
    return True


def cancel_job(r: redis.Redis, job_id: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the job to stop: the last stage ends it at its next step; a job still waiting ends now."""
    key = keys.job(job_id)
    status = keys.as_str(r.hget(key, "status") or b"")
    if not status or status in ("done", "failed"):
        return
    r.hset(key, "cancel", "1")
    if status == "queued":
        model_id = keys.as_str(r.hget(key, "model_id") or b"")
        if r.zrem(keys.waiting(model_id), job_id) and r.hsetnx(key, "failed_claim", "1"):
            usage = usage_of(r, job_id, prompt_tokens=0, completion_tokens=0)
            pipe = r.pipeline()
            pipe.xadd(keys.events(job_id), {"k": "done", "reason": "cancelled", "usage": json.dumps(usage)},
                      id="0-*")
            _close(pipe, job_id, {"status": "done", "finish_reason": "cancelled", "usage": json.dumps(usage)})
            pipe.execute()
            send_settle(job_id, dispatch=dispatch)


# --- billing ------------------------------------------------------------------------------------
def bill_ended_job(r: redis.Redis, job_id: str, *, billing: Billing) -> str:
    """Charge an ended job's usage (workers credited per token-layer) or release its hold; once per job.

    Returns what happened: "settled", "released", "already settled", "not finished" or "unknown".
    """
    job = _hash(r, job_id)
    if not job:
        return "unknown"
    if job.get("settled"):
        return "already settled"
    if job.get("status") not in ("done", "failed"):
        return "not finished"
    usage = json.loads(job["usage"]) if job.get("usage") else usage_of(r, job_id, prompt_tokens=0,
                                                                      completion_tokens=0)
    workers = {w: int(n) for w, n in usage["workers"].items() if int(n) > 0}
    if workers:
        billing.settle(job_id=job_id, usage=workers)
        outcome = "settled"
    else:
        billing.release(job_id=job_id)  # nothing was computed: the whole hold goes back
        outcome = "released"
    r.hset(keys.job(job_id), mapping={"settled": outcome, "settled_at": str(time.time())})
    return outcome


# --- reading ------------------------------------------------------------------------------------
def _events(fields: dict[Any, Any]) -> list[JobEvent]:
    f = {keys.as_str(k): keys.as_str(v) for k, v in fields.items()}
    kind = f.get("k")
    out: list[JobEvent] = []
    if f.get("t"):
        out.append(JobEvent("token", token_id=int(f["t"])))
    if kind == "done":
        out.append(JobEvent("done", finish_reason=f.get("reason"),
                            usage=json.loads(f["usage"]) if f.get("usage") else None))
    elif kind == "error":
        out.append(JobEvent("error", error=f.get("error"), finish_reason="error"))
    return out


def read_events(r: redis.Redis, job_id: str, *, last_id: str = "0-0",
                block_ms: int | None = 1000) -> tuple[str, list[JobEvent]]:
    """Events after ``last_id`` (waiting up to ``block_ms`` for the first; 0/None: don't wait).

    Returns the id to pass next time and the events in order; a "done" or "error" event is the last.
    """
    kwargs: dict[str, Any] = {}
    if block_ms:
        kwargs["block"] = int(block_ms)
    answer: Any = r.xread({keys.events(job_id): last_id}, **kwargs)
    events: list[JobEvent] = []
    for _stream, entries in answer or []:
        for entry_id, fields in entries:
            last_id = keys.as_str(entry_id)
            events += _events(fields)
    return last_id, events


def get_job(r: redis.Redis, job_id: str) -> JobView | None:
    job = _hash(r, job_id)
    if not job or "model_id" not in job:
        return None
    sampling = Sampling.from_dict(json.loads(job["gen"]))
    tokens: list[int] = []
    finish_reason = job.get("finish_reason") or None
    usage = json.loads(job["usage"]) if job.get("usage") else None
    entries: Any = r.xrange(keys.events(job_id))
    for _id, fields in entries:
        for ev in _events(fields):
            if ev.kind == "token" and ev.token_id is not None:
                tokens.append(ev.token_id)
            elif ev.kind == "done":
                finish_reason = finish_reason or ev.finish_reason
                usage = usage or ev.usage
    status = job.get("status", "queued")
    if status == "done" and job.get("error"):
        status = "failed"
    if usage is None and status in ("running", "failed"):
        usage = usage_of(r, job_id, prompt_tokens=sampling.prompt_len, completion_tokens=len(tokens))
    return JobView(job_id=job_id, status=status, user_id=job.get("user_id", ""), model_id=job["model_id"],
                   token_ids=tokens, finish_reason=finish_reason, usage=usage, error=job.get("error") or None,
                   prompt_tokens=len(json.loads(job.get("prompt_ids") or "[]")),
                   created_at=float(job.get("created") or 0.0), stop=list(sampling.stop))
