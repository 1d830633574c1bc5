"""Jobs: submit, route, stream, finish. Framework-free; every function takes a ``redis.Redis``.

Redis keys of a job (all expire a day after the job's last change; nothing here must survive a restart):

- ``azu:job:<id>``          hash: user, model, status, prompt length, sampling params, route, token, usage...
- ``azu:job:<id>:events``   stream: one entry per step with id ``0-<step+1>`` (token, or done with the
                            last token). Explicit ids make publishing idempotent: a replayed step's XADD is
                            refused by Redis because its id is not greater than the last one.
- ``azu:job:<id>:usage``    hash: worker id -> token-layers its stages ran for the job.
- ``azu:jobs:active``       zset of unfinished jobs (the watchdog's list).
- ``azu:pending:<worker>``  list: payloads for a worker that is busy or waiting for more (``send_steps``).
- ``azu:wake:<worker>``     set while a worker has been woken and has not yet taken all its payloads.

A step's payload is a msgpack map. An idle worker gets its payloads in the Celery message that wakes it;
a busy one finds them in its pending hash when it finishes its batch, and runs them all as its next batch,
so the decode steps of many jobs run together (see worker_node.WorkerNode.run).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from azu.errors import Conflict, InvalidRequest, NoCapacity
from azu.network import directory, placement
from azu.network.auth import job_token
from azu.network.dispatch import Dispatcher, get_dispatcher, worker_queue
from azu.network.wire import Hop, pack
from azu.registry.status import ModelInfo, model_info

log = logging.getLogger(__name__)

ACTIVE_KEY = "azu:jobs:active"
JOB_TTL_S = 24 * 3600
PENDING_TTL_S = 3600
STEP_DEADLINE_S = float(os.environ.get("AZU_STEP_DEADLINE_S") or 120.0)
LOAD_DEADLINE_S = float(os.environ.get("AZU_LOAD_DEADLINE_S") or 600.0)

# What one request may ask for. The API's schemas (web/schemas.py) read these; so does _validate below, for
# callers that skip the API (benchmarks, the scheduler). OpenAI's bounds where OpenAI has one.
MAX_TOKENS = 1_000_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


def job_key(job_id: str) -> str:
    return f"azu:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"azu:job:{job_id}:events"


def usage_key(job_id: str) -> str:
    return f"azu:job:{job_id}:usage"


def pending_key(worker_id: str) -> str:
    return f"azu:pending:{worker_id}"


def waiting_key(model_id: str) -> str:
    return f"azu:model:{model_id}:waiting"


def loading_key(model_id: str) -> str:
    return f"azu:model:{model_id}:loading"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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


def _validate(req: JobRequest, info: ModelInfo) -> None:
    if not req.job_id or not isinstance(req.job_id, str) or len(req.job_id) > 128 or ":" in req.job_id:
        raise InvalidRequest("job_id must be a non-empty string of at most 128 characters without ':'")
    ids = req.prompt_ids
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequest("the prompt must be a non-empty list of token ids", param="prompt")
    if min(ids) < 0 or max(ids) >= info.vocab_size:
        raise InvalidRequest(f"token ids must be in [0, {info.vocab_size})", param="prompt")
    if not isinstance(req.max_tokens, int) or not 1 <= req.max_tokens <= MAX_TOKENS:
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    if info.context_length and len(ids) + req.max_tokens > info.context_length:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                             f"model's context of {info.context_length} tokens", param="max_tokens")
    if not 0.0 <= float(req.temperature) <= 100.0:
        raise InvalidRequest("temperature must be between 0 and 100", param="temperature")
    if not 0.0 < float(req.top_p) <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if not isinstance(req.top_k, int) or req.top_k < 0:
        raise InvalidRequest("top_k must be a non-negative integer", param="top_k")
    if req.seed is not None and (not isinstance(req.seed, int) or not 0 <= req.seed < 2**63):
        raise InvalidRequest("seed must be a non-negative integer", param="seed")
    if not isinstance(req.stop, list) or len(req.stop) > 16 or not all(isinstance(s, str) for s in req.stop):
        raise InvalidRequest("stop must be a list of at most 16 strings", param="stop")
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
    loading = r.exists(loading_key(req.model_id))
    if not routes and not loading and not placement.plan_loads(info.shape, workers):
        need = placement.needed_bytes(info.shape)
        raise NoCapacity(f"no live worker holds {req.model_id} and the {len(workers)} live worker(s) "
                         f"cannot load it (it needs about {need} bytes)", param="model")
    gen = {
        "max_tokens": req.max_tokens, "temperature": float(req.temperature), "top_p": float(req.top_p),
        "top_k": int(req.top_k), "seed": req.seed if req.seed is not None else secrets.randbits(62),
        "stop": list(req.stop),
        "stop_ids": list(req.stop_token_ids if req.stop_token_ids is not None else info.eos_token_ids),
        "prompt_len": len(req.prompt_ids),
    }
    now = time.time()
    key = job_key(req.job_id)
    if not r.hsetnx(key, "status", "queued"):
        raise Conflict(f"job id {req.job_id} is already in use")
    pipe = r.pipeline()
    pipe.hset(key, mapping={
        "user_id": req.user_id, "model_id": req.model_id, "prompt_ids": json.dumps(req.prompt_ids),
        "gen": json.dumps(gen), "created": str(now), "updated": str(now), "step": "0",
    })
    pipe.expire(key, JOB_TTL_S)
    pipe.zadd(ACTIVE_KEY, {req.job_id: now})
    pipe.execute()
    if routes:
        route = placement.choose_route(routes, int(r.incr(f"azu:model:{req.model_id}:turn")))
        assert route is not None
        start_job(r, req.job_id, route, dispatch=dispatch)
        return
    r.zadd(waiting_key(req.model_id), {req.job_id: now})
    orders = ensure_placed(r, req.model_id, dispatch=dispatch)
    log.info("job %s waits for %s (%d new load order(s))", req.job_id, req.model_id, len(orders))
    # Loads may have finished between the route check and the waiting list: try once more now.
    start_waiting_jobs(r, req.model_id, dispatch=dispatch)


def ensure_placed(r: redis.Redis, model_id: str, *,
                  dispatch: Dispatcher | None = None) -> list[placement.LoadOrder]:
    """Send load orders if no live worker chain serves ``model_id`` and none are in flight. Returns them."""
    info = model_info(r, model_id)
    workers = directory.live_workers(r)
    if placement.find_routes(model_id, info.num_layers, workers) or r.exists(loading_key(model_id)):
        return []
    orders = placement.plan_loads(info.shape, workers)
    # One set of orders in flight per model (NX), until the route is complete or the deadline passes.
    if not orders or not r.set(loading_key(model_id), json.dumps([o.to_dict() for o in orders]), nx=True,
                               ex=int(LOAD_DEADLINE_S)):
        return []
    dispatch = dispatch or get_dispatcher()
    manifest_sha = _manifest_sha256(model_id)
    for order in orders:
        dispatch.send_task("workers.stage.load", queue=order.as_hop().queue,
                           kwargs={**order.to_dict(), "manifest_sha256": manifest_sha})
    return orders


def _manifest_sha256(model_id: str) -> str | None:
    """The manifest's hash as the registry has it (so a worker can check what it downloads), if local."""
    import hashlib

    from azu.registry.status import shard_dir

    path = shard_dir(model_id) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def settle(r: redis.Redis, job_id: str, *, billing: Any) -> str:
    """Charge a finished job's usage (workers credited per token-layer) or release its hold. Once."""
    job = {_s(k): _s(v) for k, v in r.hgetall(job_key(job_id)).items()}
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
    r.hset(job_key(job_id), mapping={"settled": outcome, "settled_at": str(time.time())})
    return outcome


def start_job(r: redis.Redis, job_id: str, route: list[Hop], *, dispatch: Dispatcher) -> None:
    """Sign the route and send the prompt (step 0) to the first hop."""
    raw = r.hgetall(job_key(job_id))
    job = {_s(k): _s(v) for k, v in raw.items()}
    model_id = job["model_id"]
    token = job_token(job_id, model_id, route)
    route_json = json.dumps([h.to_list() for h in route])
    r.hset(job_key(job_id), mapping={"status": "running", "route": route_json, "updated": str(time.time())})
    payload = {"job": job_id, "model": model_id, "route": [h.to_list() for h in route], "tok": token,
               "gen": json.loads(job["gen"]), "step": 0, "hop": 0, "pos": 0,
               "x": json.loads(job["prompt_ids"])}
    send_steps(r, [(route[0].worker_id, payload)], dispatch=dispatch)


def wake_key(worker_id: str) -> str:
    return f"azu:wake:{worker_id}"


# Hand step payloads to a worker. If no wake-up is outstanding (SET NX), the caller sends one Celery
# message carrying the payloads; otherwise the worker is busy (or waiting on its list for more) and they
# go on its pending list: it takes them all as its next batch (see WorkerNode.process_pending).
_HAND_OVER = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 1 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 0
"""
WAKE_TTL_S = 30  # a worker that died holding its wake key is woken again after this at the latest


def send_steps(r: redis.Redis, items: list[tuple[str, dict[str, Any]]], *, dispatch: Dispatcher,
               usage: Sequence[tuple[str, str, int]] = ()) -> None:
    """Send step payloads on: one Redis round trip (plus ``usage`` (job, worker, token-layers) counted in
    it), then one Celery message per worker that was idle. Never waits for the receiver."""
    if not items and not usage:
        return
    by_worker: dict[str, list[tuple[str, bytes]]] = {}
    for worker_id, payload in items:
        name = f"{payload['job']}:{payload['step']}:{payload['hop']}"
        by_worker.setdefault(worker_id, []).append((name, pack(payload)))
    pipe = r.pipeline(transaction=False)
    for job_id, worker_id, amount in usage:
        pipe.hincrby(usage_key(job_id), worker_id, amount)
    order = list(by_worker)
    for worker_id in order:
        args: list[Any] = [WAKE_TTL_S, PENDING_TTL_S, *(blob for _, blob in by_worker[worker_id])]
        pipe.eval(_HAND_OVER, 2, wake_key(worker_id), pending_key(worker_id), *args)
    answers = pipe.execute()[len(usage):]
    for worker_id, woke in zip(order, answers, strict=True):
        if woke:
            dispatch.send_task("workers.stage.forward", queue=worker_queue(worker_id),
                               args=[[blob for _, blob in by_worker[worker_id]]])


def start_waiting_jobs(r: redis.Redis, model_id: str, *, dispatch: Dispatcher | None = None) -> int:
    """Start the jobs waiting for ``model_id`` if live workers now hold a complete route. Returns how many.

    Under a per-model lock: two workers finishing their loads at once must not both miss the route
    (each seeing only its own part) nor both start the same job.
    """
    if not r.zcard(waiting_key(model_id)):
        return 0
    dispatch = dispatch or get_dispatcher()
    started = 0
    with r.lock(f"azu:model:{model_id}:startlock", timeout=30, blocking_timeout=30):
        info = model_info(r, model_id)
        routes = placement.find_routes(model_id, info.num_layers, directory.live_workers(r))
        if not routes:
            return 0
        r.delete(loading_key(model_id))
        for raw in r.zrange(waiting_key(model_id), 0, -1):
            job_id = _s(raw)
            if not r.zrem(waiting_key(model_id), job_id):
                continue
            if _s(r.hget(job_key(job_id), "status") or b"") != "queued":
                continue  # cancelled or failed while waiting
            route = placement.choose_route(routes, int(r.incr(f"azu:model:{model_id}:turn")))
            assert route is not None
            start_job(r, job_id, route, dispatch=dispatch)
            started += 1
    return started


def fail_waiting_jobs(r: redis.Redis, model_id: str, reason: str, *,
                      dispatch: Dispatcher | None = None) -> int:
    dispatch = dispatch or get_dispatcher()
    r.delete(loading_key(model_id))
    n = 0
    for raw in r.zrange(waiting_key(model_id), 0, -1):
        job_id = _s(raw)
        if r.zrem(waiting_key(model_id), job_id):
            fail_job(r, job_id, reason, dispatch=dispatch)
            n += 1
    return n


# --- finishing ----------------------------------------------------------------------------------
def usage_of(r: redis.Redis, job_id: str, *, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    workers = {_s(k): int(v) for k, v in r.hgetall(usage_key(job_id)).items()}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "token_layers": sum(workers.values()), "workers": workers}


def _end_caches(job_id: str, model_id: str, route: list[Hop], token: str, *, skip: str | None,
                dispatch: Dispatcher) -> None:
    for worker_id in sorted({h.worker_id for h in route} - {skip}):
        dispatch.send_task("workers.stage.end_job", queue=worker_queue(worker_id),
                           kwargs={"job_id": job_id, "model_id": model_id,
                                   "route": [h.to_list() for h in route], "token": token})


def _close(pipe: Any, job_id: str, fields: dict[str, str]) -> None:
    """The end-of-job write every ending shares: final fields, off the active list, keys expire."""
    now = str(time.time())
    pipe.hset(job_key(job_id), mapping={**fields, "updated": now, "finished": now})
    pipe.zrem(ACTIVE_KEY, job_id)
    for k in (job_key(job_id), events_key(job_id), usage_key(job_id)):
        pipe.expire(k, JOB_TTL_S)


def finish_job(r: redis.Redis, job_id: str, *, model_id: str, route: list[Hop], token: str, reason: str,
               usage: dict[str, Any], last_worker: str, dispatch: Dispatcher) -> None:
    """Record a finished job (the done event is already published), settle it, free the other caches."""
    pipe = r.pipeline()
    _close(pipe, job_id, {"status": "done", "finish_reason": reason, "usage": json.dumps(usage)})
    pipe.execute()
    dispatch.send_task("workers.scheduler.settle", queue="core", kwargs={"job_id": job_id})
    _end_caches(job_id, model_id, route, token, skip=last_worker, dispatch=dispatch)


def fail_job(r: redis.Redis, job_id: str, reason: str, *, dispatch: Dispatcher | None = None) -> bool:
    """Mark the job failed with ``reason`` (once), tell the client, release or settle, free the caches."""
    dispatch = dispatch or get_dispatcher()
    key = job_key(job_id)
    job = {_s(k): _s(v) for k, v in r.hgetall(key).items()}
    if not job or job.get("status") in ("done", "failed"):
        return False
    # Claim the transition: only one of (watchdog, stage, cancel) records the failure.
    if not r.hsetnx(key, "failed_claim", "1"):
        return False
    prompt_len = int(json.loads(job.get("gen") or "{}").get("prompt_len", 0))
    done_steps = int(job.get("step") or 0)
    usage = usage_of(r, job_id, prompt_tokens=prompt_len, completion_tokens=done_steps)
    pipe = r.pipeline()
    pipe.xadd(events_key(job_id), {"k": "error", "error": reason}, id="0-*")
    _close(pipe, job_id, {"status": "failed", "error": reason, "finish_reason": "error",
                          "usage": json.dumps(usage)})
    pipe.execute()
    dispatch.send_task("workers.scheduler.settle", queue="core", kwargs={"job_id": job_id})
    if job.get("route"):
        route = [Hop.from_list(h) for h in json.loads(job["route"])]
        token = job_token(job_id, job["model_id"], route)
        _end_caches(job_id, job["model_id"], route, token, skip=None, dispatch=dispatch)
    return True


def cancel_job(r: redis.Redis, job_id: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the job to stop: the last stage ends it at its next step; a job still waiting ends now."""
    key = job_key(job_id)
    status = _s(r.hget(key, "status") or b"")
    if not status or status in ("done", "failed"):
        return
    r.hset(key, "cancel", "1")
    if status == "queued":
        model_id = _s(r.hget(key, "model_id") or b"")
        if r.zrem(waiting_key(model_id), job_id) and r.hsetnx(key, "failed_claim", "1"):
            usage = usage_of(r, job_id, prompt_tokens=0, completion_tokens=0)
            pipe = r.pipeline()
            pipe.xadd(events_key(job_id), {"k": "done", "reason": "cancelled", "usage": json.dumps(usage)},
                      id="0-*")
            _close(pipe, job_id, {"status": "done", "finish_reason": "cancelled", "usage": json.dumps(usage)})
            pipe.execute()
            (dispatch or get_dispatcher()).send_task("workers.scheduler.settle", queue="core",
                                                     kwargs={"job_id": job_id})


# --- reading ------------------------------------------------------------------------------------
def _events(fields: dict[Any, Any]) -> list[JobEvent]:
    f = {_s(k): _s(v) for k, v in fields.items()}
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
    answer: Any = r.xread({events_key(job_id): last_id}, **kwargs)
    events: list[JobEvent] = []
    for _stream, entries in answer or []:
        for entry_id, fields in entries:
            last_id = _s(entry_id)
            events += _events(fields)
    return last_id, events


def get_job(r: redis.Redis, job_id: str) -> JobView | None:
    job = {_s(k): _s(v) for k, v in r.hgetall(job_key(job_id)).items()}
    if not job or "model_id" not in job:
        return None
    tokens: list[int] = []
    finish_reason = job.get("finish_reason") or None
    usage = json.loads(job["usage"]) if job.get("usage") else None
    entries: Any = r.xrange(events_key(job_id))
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
        usage = usage_of(r, job_id, prompt_tokens=int(json.loads(job["gen"])["prompt_len"]),
                         completion_tokens=len(tokens))
    return JobView(job_id=job_id, status=status, user_id=job.get("user_id", ""), model_id=job["model_id"],
                   token_ids=tokens, finish_reason=finish_reason, usage=usage, error=job.get("error") or None,
                   prompt_tokens=len(json.loads(job.get("prompt_ids") or "[]")),
                   created_at=float(job.get("created") or 0.0))


# --- the watchdog -------------------------------------------------------------------------------
def watchdog(r: redis.Redis, *, now: float | None = None, step_deadline_s: float = STEP_DEADLINE_S,
             load_deadline_s: float = LOAD_DEADLINE_S, dispatch: Dispatcher | None = None) -> list[str]:
    """Fail jobs that made no progress within their deadline; retry waiting ones. Returns failed ids."""
    now = time.time() if now is None else now
    failed: list[str] = []
    retried: set[str] = set()  # models whose waiting jobs were retried this tick (it starts them all)
    for raw in r.zrange(ACTIVE_KEY, 0, -1):
        job_id = _s(raw)
        job = {_s(k): _s(v) for k, v in r.hgetall(job_key(job_id)).items()}
        if not job:
            r.zrem(ACTIVE_KEY, job_id)
            continue
        status = job.get("status")
        idle = now - float(job.get("updated") or 0.0)
        if status == "queued":
            if job["model_id"] not in retried:
                retried.add(job["model_id"])
                start_waiting_jobs(r, job["model_id"], dispatch=dispatch)
            if idle > load_deadline_s and _s(r.hget(job_key(job_id), "status") or b"") == "queued":
                r.zrem(waiting_key(job["model_id"]), job_id)
                reason = f"no worker could load {job['model_id']} within {load_deadline_s:.0f}s"
                if fail_job(r, job_id, reason, dispatch=dispatch):
                    failed.append(job_id)
        elif status == "running" and idle > step_deadline_s:
            route = [Hop.from_list(h) for h in json.loads(job.get("route") or "[]")]
            dead = [h.worker_id for h in route if not directory.is_live(r, h.worker_id, now=now)]
            why = f"; worker(s) {', '.join(dead)} stopped heartbeating" if dead else ""
            reason = f"stalled: no progress for {idle:.0f}s at step {job.get('step', '?')}{why}"
            if fail_job(r, job_id, reason, dispatch=dispatch):
                failed.append(job_id)
    return failed
