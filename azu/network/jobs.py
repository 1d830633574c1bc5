"""The job lifecycle: submit, start, send on, finish, fail, cancel, read, and bill once ended.

Framework-free; every function takes a ``redis.Redis``. A job's Redis keys (azu.network.keys) expire a day
after its last change; the job hash is the record the bill is made from until billed (the core's Redis runs
with AOF; azu.billing.reconcile closes holds whose jobs Redis forgot). Its events stream has one entry per
step with id ``0-<step+1>``: explicit ids make publishing idempotent (a replayed step's XADD is refused
because its id is not greater than the last one).

Steps travel as ``StepPayload``s (azu.network.wire) through the workers' inboxes (azu.network.inbox); the
worker side is azu.network.node, the watchdog azu.network.watchdog, and the core loop that acts on the
workers' reports (publishes tokens, ends jobs, keeps the directory) azu.network.collector.

Only core processes run this module's writers. The facts the ledger bills from are the core's own: each job's
route is in a core-signed grant, usage is the route's layers times the tokens the core published, and the
end-of-job record the scheduler bills from is signed by the core (``auth.END_RECORD``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from azu.billing.base import Billing
from azu.billing.economics import token_layers
from azu.config import get_settings
from azu.engine.span import Span
from azu.errors import AzuError, Conflict, InvalidRequest, NoCapacity
from azu.network import auth, directory, inbox, keys, placement
from azu.network.dispatch import Dispatcher, get_dispatcher, send_load, send_settle
from azu.network.wire import (
    MAX_IDS,
    MAX_MESSAGE,
    MAX_STEPS,
    MAX_STOP_IDS,
    EndOrder,
    Hop,
    JobGrant,
    Sampling,
    StepBundle,
    StepPayload,
    end_order_part,
    route_from_list,
)
from azu.registry.status import ModelInfo, model_info

log = logging.getLogger(__name__)

# What one request may ask for. The API's schemas (web/schemas.py) read these; so does _validate below, for
# callers that skip the API (benchmarks, the scheduler). OpenAI's bounds where OpenAI has one.
MAX_TOKENS = 1_000_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 4096  # each (they travel in the job's grant, which workers read within limits)
MAX_SEED = 2**63 - 1


_BINARY = ("grant", "grant_sig", "end_sig")  # fields that hold bytes, not text


def _hash(r: redis.Redis, job_id: str) -> dict[str, str]:
    """The job's record as text (empty if unknown or expired); binary fields left out."""
    raw: dict[Any, Any] = r.hgetall(keys.job(job_id))  # type: ignore[assignment]
    return job_fields(raw)


def job_fields(raw: dict[Any, Any]) -> dict[str, str]:
    """A job hash as Redis answered it, as text (binary fields left out)."""
    return {keys.as_str(k): keys.as_str(v) for k, v in raw.items() if keys.as_str(k) not in _BINARY}


def _hash_raw(r: redis.Redis, job_id: str) -> dict[str, Any]:
    """The job's record: text fields as str, binary fields (grant, signatures) as bytes."""
    raw: dict[Any, Any] = r.hgetall(keys.job(job_id))  # type: ignore[assignment]
    return {keys.as_str(k): (v if keys.as_str(k) in _BINARY else keys.as_str(v)) for k, v in raw.items()}


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
    if len(ids) + req.max_tokens > MAX_IDS:  # a re-routed job's replay carries both in one step
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                             f"{MAX_IDS} tokens a step may carry", param="max_tokens")
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
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in req.stop)):
        raise InvalidRequest(f"stop must be a list of at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_CHARS} characters", param="stop")
    if req.stop_token_ids is not None and not all(isinstance(t, int) for t in req.stop_token_ids):
        raise InvalidRequest("stop_token_ids must be token ids", param="stop_token_ids")
    if req.stop_token_ids is not None and len(req.stop_token_ids) > MAX_STOP_IDS:  # they travel in the grant
        raise InvalidRequest(f"at most {MAX_STOP_IDS} stop_token_ids", param="stop_token_ids")


# --- submitting and starting --------------------------------------------------------------------
# Claim a job id and write the job (KEYS: the job, the active jobs, the model's turn counter; ARGV: the job
# id, now, the record's TTL, whether to count a turn, then the record's fields and values): -1 if the id is
# taken, else the model's next turn (0 when not counted), in one atomic step.
_CREATE = """
if redis.call('HSETNX', KEYS[1], 'status', 'queued') == 0 then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[4] == '1' then return redis.call('INCR', KEYS[3]) end
return 0
"""


def routes_for(r: redis.Redis, model_id: str, num_layers: int, *, avoid: Sequence[str] = (),
               now: float | None = None, per_span: int = 0, also: Sequence[str] = (),
               whole: bool = True) -> tuple[directory.Snapshot, placement.Routes]:
    """The routes of ``model_id`` over its live holders, with the snapshot they came from (its identities
    make the grant).

    The model's index is read first (its holders only: what a job's first token waits for); with
    ``per_span``, at most that many holders of each span (a submit, a re-route: ``directory.SUBMIT_PER_SPAN``)
    and ``also`` these if live (a re-routed job's surviving hops), and every holder where those give no
    route. Where the holders give no route, placement's workers are read and routed over
    (``placement_routes``): the index is filled by heartbeats, so it may lag the records (a collector of a
    version before it; a key lost), and placement would not order loads for a model it sees served. A
    holder the index lacks is among them only if it is among the roomiest, or where the network is small
    enough to be read whole. So where there is no route, the snapshot returned is placement's: who could
    load the model. ``whole=False``: the holders only (a submit while the core's loads of the model are in
    flight: ``submit_job``)."""
    known = directory.snapshot(r, model_id=model_id, now=now, per_span=per_span, also=also)
    routes = placement.Routes(model_id, num_layers, known.workers, avoid=set(avoid))
    if routes.exists():
        return known, routes
    if known.sampled:
        known = directory.snapshot(r, model_id=model_id, now=now)
        routes = placement.Routes(model_id, num_layers, known.workers, avoid=set(avoid))
        if routes.exists() or not whole:
            return known, routes
    return placement_routes(r, model_id, num_layers, avoid=avoid, now=now) if whole else (known, routes)


def placement_read(r: redis.Redis, model_id: str, *, also: Sequence[str] = (),
                   now: float | None = None) -> directory.Snapshot:
    """Whom placement plans ``model_id``'s loads over: its live holders and the ``directory.PLACE_ROOMIEST``
    roomiest other live workers (every live worker where that is 0; at least 16 for each copy kept: a copy
    takes 16 workers at most), and ``also`` these if live (the workers of its load orders)."""
    if directory.PLACE_ROOMIEST <= 0:
        return directory.snapshot(r, now=now)
    roomiest = max(directory.PLACE_ROOMIEST, placement.MAX_HOPS * get_settings().copies)
    return directory.snapshot(r, model_id=model_id, now=now, roomiest=roomiest, also=also)


def placement_routes(r: redis.Redis, model_id: str, num_layers: int, *, avoid: Sequence[str] = (),
                     now: float | None = None) -> tuple[directory.Snapshot, placement.Routes]:
    """The routes of ``model_id`` over placement's workers (``routes_for``'s last resort), with them."""
    known = placement_read(r, model_id, now=now)
    routes = placement.Routes(model_id, num_layers, known.workers, avoid=set(avoid))
    if routes.exists():
        log.warning("%s: the holders' index gave no route, placement's workers do (index behind the records)",
                    model_id)
    return known, routes


def loading_in_flight(r: redis.Redis, model_id: str) -> bool:
    """Whether the core's load orders for ``model_id`` are in flight (``place`` found no route over its
    live holders and ordered them; the key goes when ``start_waiting_jobs`` finds a route, when a load
    fails, or at the load deadline)."""
    return bool(r.exists(keys.loading(model_id)))


def _could_load(info: ModelInfo, workers: list[directory.WorkerInfo]) -> bool:
    """Whether ``workers`` (whom placement plans over: ``placement_read``, less the room of those whose load
    of the model failed lately: ``_usable``) have room to load the model (``placement.plan_loads``)."""
    return bool(placement.plan_loads(info.shape, workers, max_copies=get_settings().copies))


def _usable(workers: Sequence[directory.WorkerInfo],
            failed: Mapping[str, float]) -> list[directory.WorkerInfo]:
    """``workers`` as placement plans over them: no room at those whose load failed lately (``failed``, from
    ``orders_in_flight``), so no order goes to them again before their back-off ends."""
    return [replace(w, free_memory=0) if w.worker_id in failed else w for w in workers]


def _no_capacity(model_id: str, info: ModelInfo, workers: Sequence[directory.WorkerInfo],
                 failed: Mapping[str, float], now: float) -> NoCapacity:
    """Why no job of ``model_id`` can wait for a load: nobody read has room for it, or it needs workers whose
    load of it failed lately (then ``Retry-After`` is when enough of their back-offs have ended for
    placement to order the load: the earliest end at which the workers read could load it)."""
    need = placement.needed_bytes(info.shape)
    read = {w.worker_id for w in workers}
    for end in sorted({e for worker_id, e in failed.items() if worker_id in read}):
        if _could_load(info, _usable(workers, {w: e for w, e in failed.items() if e > end})):
            names = ", ".join(sorted(w for w, e in failed.items() if e <= end and w in read)[:5])
            return NoCapacity(f"no live worker holds {model_id}, and loading it needs workers whose load of "
                              f"it failed in the last {FAILED_LOAD_BACKOFF_S:.0f} s ({names}); they are "
                              f"asked again after that: retry after the time in Retry-After", param="model",
                              retry_after=max(1, math.ceil(end - now)))
    roomiest = max((w.free_memory for w in workers), default=0)
    return NoCapacity(f"no live worker holds {model_id} and the live workers cannot load it (it needs about "
                      f"{need} bytes; the roomiest of the {len(workers)} read has {roomiest} free)",
                      param="model")


def submit_job(r: redis.Redis, req: JobRequest, *, dispatch: Dispatcher | None = None,
               info: ModelInfo | None = None) -> None:
    """Route the job (or order the loads it needs), store it and enqueue its first step.

    ``info``: the model's routing facts where the caller has just read them (the API, for the hold), so
    they are not read again on the way to the first token.

    Raises NotFound (unknown model), NoCapacity (model still sharding; no live worker can hold it),
    InvalidRequest (bad parameters), Conflict (job id already used).
    """
    info = info if info is not None else model_info(r, req.model_id)
    _validate(req, info)
    dispatch = dispatch or get_dispatcher()
    # The model's live holders (a window of each span's, where many hold it) with their identities: the grant
    # reads nothing more.
    known, routes = routes_for(r, req.model_id, info.num_layers, per_span=directory.SUBMIT_PER_SPAN,
                               whole=False)
    servable = routes.exists()
    # Not served: while the core's loads of it are in flight (a model just placed, or placed again after a
    # loss), the job waits for them, reading nothing more (every job of a model being loaded read the whole
    # directory three times: here, for placement, for the waiting jobs: ``bench/submit.py``); the collector
    # starts the waiting jobs when a load is reported, and re-plans an order lost with its worker
    # (``keep_placed``). Else placement's workers (its holders and the roomiest others): an index behind
    # the records, or who could load it.
    loading = not servable and loading_in_flight(r, req.model_id)
    if not servable and not loading:
        known, routes = placement_routes(r, req.model_id, info.num_layers)
        servable = routes.exists()
        if not servable:
            # As placement will plan: a worker whose load of the model failed lately is not ordered it again
            # before its back-off ends, so where only such workers could load it the job is refused now,
            # with the time to wait (it waited out the back-off, holding its request, until the collector's
            # placement check ordered the load again). Read only: the orders' bookkeeping is placement's,
            # under the model's lock.
            now = time.time()
            _pending, failed = orders_in_flight(r, req.model_id, known.workers, now=now, record=False)
            if not _could_load(info, _usable(known.workers, failed)):
                raise _no_capacity(req.model_id, info, known.workers, failed, now)
    sampling = Sampling(
        max_tokens=req.max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
        top_k=int(req.top_k), seed=req.seed if req.seed is not None else secrets.randbits(62),
        stop=tuple(req.stop),
        stop_ids=tuple(req.stop_token_ids if req.stop_token_ids is not None else info.eos_token_ids),
        prompt_len=len(req.prompt_ids))
    now = time.time()
    fields = {"user_id": req.user_id, "model_id": req.model_id, "prompt_ids": json.dumps(req.prompt_ids),
              "gen": json.dumps(sampling.to_dict()), "created": str(now), "updated": str(now), "step": "0"}
    # One round trip (a job's first token waits for this): claim the id, write the job, count the turn.
    turn = int(r.eval(_CREATE, 3, keys.job(req.job_id), keys.ACTIVE_JOBS, keys.turn(req.model_id),  # type: ignore[arg-type]
                      req.job_id, str(now), keys.JOB_TTL_S, "1" if servable else "0",
                      *(part for item in fields.items() for part in item)))
    if turn < 0:
        raise Conflict(f"job id {req.job_id} is already in use")
    if servable:
        route = routes.pick(turn)
        assert route is not None
        start_job(r, req.job_id, route, dispatch=dispatch, job={**fields, "status": "queued"}, known=known)
        return
    r.zadd(keys.waiting(req.model_id), {req.job_id: now})
    orders = [] if loading else ensure_placed(r, req.model_id, dispatch=dispatch)
    log.info("job %s waits for %s (%d new load order(s))", req.job_id, req.model_id, len(orders))
    # Loads may have finished between the route check and the waiting list: try once more now, on the
    # holders only (a finished load is in the index with its worker's record; placement's workers were read
    # above, or are being loaded).
    start_waiting_jobs(r, req.model_id, dispatch=dispatch, whole=False)


def ensure_placed(r: redis.Redis, model_id: str, *,
                  dispatch: Dispatcher | None = None) -> list[placement.LoadOrder]:
    """Send the load orders that complete a route for ``model_id`` (and its spare copies) if no live worker
    chain serves it. Returns the orders sent ([] if a route exists, or all that is needed is in flight)."""
    return place(r, model_id, spares=False, dispatch=dispatch)


def keep_placed(r: redis.Redis, *, dispatch: Dispatcher | None = None) -> list[placement.LoadOrder]:
    """Keep every model the core placed (or that lost a worker) servable, with ``AZU_COPIES`` copies of each
    span while capacity allows: a worker that restarted empty is ordered its span again, a copy lost with a
    worker is rebuilt elsewhere. Called by the collector's loop every few seconds and by the watchdog beat.
    Returns the orders sent."""
    sent: list[placement.LoadOrder] = []
    for raw in r.smembers(keys.READY_MODELS):  # type: ignore[union-attr]
        model_id = keys.as_str(raw)
        if not r.hexists(keys.model(model_id), PLACED):
            continue
        # While jobs wait for a route, only that route is planned (again, if an order died with its worker):
        # the spare copies come after, so the jobs resume on the route that keeps their surviving hops.
        waiting = bool(r.zcard(keys.waiting(model_id)))
        copies = 1 if waiting else get_settings().copies
        try:
            if _placed_enough(r, model_id, copies):
                continue  # nothing to plan: placement's read, and the model's lock, are not needed
            sent += place(r, model_id, spares=not waiting, copies=copies, dispatch=dispatch)
        except AzuError as exc:  # a model being re-sharded, say: the others still get their copies
            log.warning("keeping %s placed: %s", model_id, exc.message)
    return sent


def _placed_enough(r: redis.Redis, model_id: str, copies: int) -> bool:
    """Whether the model's live holders already make a route and hold every layer ``copies`` times: what
    ``place`` would then plan is nothing, and it reads every holder and the roomiest other workers (it read
    every live worker's record, before ``placement_read``) to find that out, every ``KEEP_EVERY_S`` on the
    collector's thread, which publishes the tokens. This reads the windows of each span's holders a submit
    reads (a share of the holders: a route and copies there are so among them all), and every holder only
    where those fall short."""
    info = model_info(r, model_id)
    for per_span in (directory.SUBMIT_PER_SPAN, 0):
        known = directory.snapshot(r, model_id=model_id, per_span=per_span)
        if (placement.Routes(model_id, info.num_layers, known.workers).exists()
                and placement.fewest_copies(model_id, info.num_layers, known.workers) >= copies):
            return True
        if not known.sampled:
            return False  # that was every holder
    return False


# Model hash field: the core keeps this model's copies (set on its first placement, or on a loss).
PLACED = "placed"
FAILED_LOAD_BACKOFF_S = 60.0  # a worker whose load of a model failed gets no new order for it this long


def _order_field(worker_id: str, span: Span) -> str:
    return json.dumps([worker_id, *span.to_list()])


def _ordered_worker(field_raw: Any) -> str:
    """The worker an ``orders`` field names (``_order_field``)."""
    return str(json.loads(keys.as_str(field_raw))[0])


def orders_in_flight(r: redis.Redis, model_id: str, workers: Sequence[directory.WorkerInfo], *,
                     now: float | None = None,
                     record: bool = True) -> tuple[list[placement.LoadOrder], dict[str, float]]:
    """The load orders of ``model_id`` still in flight, and the workers whose load of it failed lately, each
    with when its back-off ends.

    An order is in flight until its worker holds the span; it is over when the worker is not live, was
    restarted after the order (a killed process may have taken the message with it), or the load deadline
    passed. An order whose span left the worker's ``assigned`` set failed (the collector removes it on a
    ``load_failed`` report): that worker is left out of this model's plans for ``FAILED_LOAD_BACKOFF_S`` from
    when the failure is first seen. ``record``: mark failures first seen and delete orders that are over
    (placement, under the model's lock); without it nothing is written (a submit's look: it reads fewer
    workers than placement, and must not race placement's orders).
    """
    now = time.time() if now is None else now
    raw: dict[Any, Any] = r.hgetall(keys.orders(model_id))  # type: ignore[assignment]
    if not raw:
        return [], {}
    live = {w.worker_id: w for w in workers}
    parsed = []
    for field_raw, at_raw in raw.items():
        worker_id, *span_list = json.loads(keys.as_str(field_raw))
        parsed.append((keys.as_str(field_raw), worker_id, Span.from_list(span_list), keys.as_str(at_raw)))
    pipe = r.pipeline(transaction=False)
    for _f, worker_id, span, _at in parsed:
        pipe.sismember(keys.assigned(worker_id), span_key(model_id, span))
    still_assigned = pipe.execute()
    deadline = get_settings().load_deadline_s
    pending: list[placement.LoadOrder] = []
    failed: dict[str, float] = {}
    over: list[str] = []
    for (field_name, worker_id, span, at_text), assigned in zip(parsed, still_assigned, strict=True):
        failed_at = at_text.startswith("failed:")
        at = float(at_text.removeprefix("failed:"))
        w = live.get(worker_id)
        if failed_at or not assigned:
            if not failed_at:  # seen failed now: the back-off starts now
                at = now
                if record:
                    r.hset(keys.orders(model_id), field_name, f"failed:{now}")
            if now - at < FAILED_LOAD_BACKOFF_S:
                failed[worker_id] = max(failed.get(worker_id, 0.0), at + FAILED_LOAD_BACKOFF_S)
            else:
                over.append(field_name)
        elif w is None or span in w.holds(model_id) or now - at > deadline or w.started_at > at:
            over.append(field_name)
        else:
            pending.append(placement.LoadOrder(worker_id, model_id, span))
    if over and record:
        r.hdel(keys.orders(model_id), *over)
    return pending, failed


def place(r: redis.Redis, model_id: str, *, spares: bool, copies: int | None = None,
          dispatch: Dispatcher | None = None) -> list[placement.LoadOrder]:
    """Plan and send the load orders ``model_id`` misses (azu.network.placement.plan_loads), counting the
    orders in flight as held. ``spares=False``: only if no live route serves it (a first placement, a loss
    with no spare copy); ``spares=True``: also the spare copies. ``copies``: how many copies to plan
    (default ``AZU_COPIES``). Planned over ``placement_read``'s workers: the model's live holders, the
    roomiest others and the workers of its orders. Under the model's lock, so two processes placing it at
    once do not both order the same span. Returns the orders sent."""
    info = model_info(r, model_id)
    settings = get_settings()
    with r.lock(keys.start_lock(model_id), timeout=30, blocking_timeout=30):
        now = time.time()
        ordered: list[Any] = r.hkeys(keys.orders(model_id))  # type: ignore[assignment]
        also = sorted({_ordered_worker(f) for f in ordered})  # whether they are still live: orders_in_flight
        workers = placement_read(r, model_id, also=also, now=now).workers
        servable = placement.Routes(model_id, info.num_layers, workers).exists()
        if servable and not spares:
            return []
        pending, failed = orders_in_flight(r, model_id, workers, now=now)
        orders = placement.plan_loads(info.shape, _usable(workers, failed),
                                      max_copies=copies or settings.copies, pending=pending)
        r.hset(keys.model(model_id), PLACED, str(settings.copies))
        if not servable and (orders or pending):
            # What submit and the watchdog read as "the model is being loaded": jobs wait instead of a 503.
            r.set(keys.loading(model_id), json.dumps([o.to_dict() for o in [*pending, *orders]]),
                  ex=int(settings.load_deadline_s))
        if not orders:
            return []
        dispatch = dispatch or get_dispatcher()
        manifest_sha = _manifest_sha256(model_id)
        for order in orders:
            order_load(r, order.worker_id, order.model_id, order.span, manifest_sha256=manifest_sha,
                       dispatch=dispatch, now=now)
    log.info("placing %s: %s", model_id, ", ".join(f"{o.worker_id} {o.span}" for o in orders))
    return orders


def span_key(model_id: str, span: Span) -> str:
    """How an ordered span is written in a worker's ``assigned`` set."""
    return json.dumps([model_id, *span.to_list()])


def order_load(r: redis.Redis, worker_id: str, model_id: str, span: Span, *,
               manifest_sha256: str | None = None, dispatch: Dispatcher | None = None,
               now: float | None = None) -> None:
    """Order ``worker_id`` to load ``span``: recorded first (placement believes only ordered spans, and counts
    the order as in flight until the span is held), then sent on the worker's control queue."""
    pipe = r.pipeline()
    pipe.sadd(keys.assigned(worker_id), span_key(model_id, span))
    pipe.hset(keys.orders(model_id), _order_field(worker_id, span), str(time.time() if now is None else now))
    pipe.expire(keys.orders(model_id), keys.JOB_TTL_S)
    pipe.execute()
    send_load(worker_id, model_id, span, manifest_sha256=manifest_sha256, dispatch=dispatch)


def _manifest_sha256(model_id: str) -> str | None:
    """The manifest's hash as the registry has it (so a worker can check what it downloads), if local."""
    from azu.registry.status import shard_dir

    path = shard_dir(model_id) / "manifest.json"
    try:
        with open(path, "rb") as f:
            found = os.fstat(f.fileno())  # the file opened, not whatever the path names a moment later
            if not stat.S_ISREG(found.st_mode):
                return None
            key = (str(path), found.st_mtime_ns, found.st_size, found.st_ino)
            with _MANIFEST_HASHES_LOCK:  # a manifest is a few kB: hashing it under the lock is cheap
                if key not in _MANIFEST_HASHES:
                    _MANIFEST_HASHES[key] = hashlib.sha256(f.read()).hexdigest()
                    while len(_MANIFEST_HASHES) > 256:
                        _MANIFEST_HASHES.pop(next(iter(_MANIFEST_HASHES)))
                return _MANIFEST_HASHES[key]
    except OSError:
        return None


# Manifest hashes by (path, mtime, size, inode): every job's grant names its manifest's hash, and a re-shard
# renames a new file over it (a new inode), so a kept hash is that of the file as it is.
_MANIFEST_HASHES: dict[tuple[str, int, int, int], str] = {}
_MANIFEST_HASHES_LOCK = threading.Lock()


GRANT_SLACK_S = 300.0  # a grant outlives the request timeout by this much (queueing, clock skew)


def make_grant(r: redis.Redis, job_id: str, model_id: str, route: Sequence[Hop], sampling: Sampling, *,
               epoch: int = 0, start: int = 0, now: float | None = None,
               known: directory.Snapshot | None = None) -> tuple[bytes, bytes]:
    """The job's grant, signed by the core: (grant bytes, signature). Each hop names its worker's enrolled
    public key (``azu:identity:<worker>``); NoCapacity if a hop's worker has none. ``known``: the directory
    as the caller has just read it, with the identities (``directory.snapshot``): no read of its own when it
    has every hop (a job's first token waits for each round trip)."""
    ids = [h.worker_id for h in route]
    from_snapshot = known.keys_and_addresses(ids) if known is not None else None
    found: list[Any]
    urls: list[Any]
    if from_snapshot is not None:
        found, urls = from_snapshot
    else:
        pipe = r.pipeline(transaction=False)
        pipe.mget([keys.identity(w) for w in ids])
        pipe.mget([keys.worker(w) for w in ids])
        found, records = pipe.execute()
        urls = [_p2p_url(raw) for raw in records]
    missing = [w for w, k in zip(ids, found, strict=True) if not k]
    if missing:
        raise NoCapacity(f"worker(s) {', '.join(missing)} have no enrolled identity")
    now = time.time() if now is None else now
    grant = JobGrant(job_id=job_id, model_id=model_id, manifest_sha256=_manifest_sha256(model_id) or "",
                     route=tuple(route), public_keys=tuple(keys.as_str(k) for k in found), sampling=sampling,
                     epoch=epoch, expires_at=now + get_settings().request_timeout_s + GRANT_SLACK_S,
                     start=start, direct=_direct_addresses(urls)).pack()
    return grant, auth.sign(auth.core_signing_key(), auth.GRANT, grant)


def _p2p_url(raw: Any) -> Any:
    """The direct-path address in a worker's directory record (raw JSON), if any."""
    try:
        return json.loads(raw).get("p2p_url") if raw else None
    except (ValueError, AttributeError):
        return None


def _direct_addresses(urls: Sequence[Any]) -> tuple[str, ...]:
    """Each hop's direct-path address ("" for none, or for anything not text); () when no hop has one."""
    out = tuple(url if isinstance(url, str) else "" for url in urls)
    return out if any(out) else ()


def start_job(r: redis.Redis, job_id: str, route: list[Hop], *, dispatch: Dispatcher,
              job: dict[str, str] | None = None, known: directory.Snapshot | None = None) -> None:
    """Grant the job its route and send the prompt (step 0) to the first hop; ``job``: its record, where
    the caller has just written it (else it is read); ``known``: the directory the route came from."""
    job = job if job is not None else _hash(r, job_id)
    model_id = job["model_id"]
    sampling = Sampling.from_dict(json.loads(job["gen"]))
    try:
        grant, grant_sig = make_grant(r, job_id, model_id, route, sampling, known=known)
    except AzuError as exc:
        fail_job(r, job_id, exc.message, dispatch=dispatch)
        return
    route_json = json.dumps([h.to_list() for h in route])
    first = StepPayload(job_id=job_id, step=0, hop=0, pos=0, x=json.loads(job["prompt_ids"]), grant=grant,
                        grant_sig=grant_sig)
    # The record's new state goes in the hand-over's round trip, ahead of it (a worker that reports the
    # first token finds the job running).
    pipe = r.pipeline(transaction=True)  # a write Redis refuses (out of memory) stops the hand-over too
    pipe.hset(keys.job(job_id), mapping={"status": "running", "route": route_json, "grant": grant,
                                         "grant_sig": grant_sig, "epoch": "0", "updated": str(time.time())})
    send_steps(r, [first], dispatch=dispatch, pipe=pipe)


def parts(steps: Sequence[StepPayload]) -> Iterator[Sequence[StepPayload]]:
    """``steps`` in runs that each make bundles a receiver reads (``wire.INBOX``: at most ``MAX_STEPS`` steps
    and ``MAX_MESSAGE`` bytes, here counted with room to spare): a micro-batch of thousands of jobs, or of
    large hidden states, goes in several bundles."""
    start, size = 0, 0
    for i, step in enumerate(steps):
        x = step.x
        n = (len(x) if isinstance(x, bytes) else 9 * len(x)) + len(step.grant) + len(step.job_id) + 128
        if i > start and (i - start >= MAX_STEPS or size + n > MAX_MESSAGE // 2):
            yield steps[start:i]
            start, size = i, 0
        size += n
    if start < len(steps):
        yield steps[start:]


def bundles(steps: Sequence[StepPayload], *, sender: str, key: Any) -> dict[str, bytes]:
    """The steps grouped by the worker of their hop, each group a bundle signed by ``sender`` with ``key``."""
    by_worker: dict[str, list[bytes]] = {}
    for step in steps:
        by_worker.setdefault(step.here.worker_id, []).append(step.pack())
    out = {}
    for worker_id, packed in by_worker.items():
        bundle = StepBundle(sender=sender, steps=tuple(packed))
        signed = StepBundle(sender, bundle.steps, auth.sign(key, auth.STEPS, bundle.signed_part()))
        out[worker_id] = signed.pack()
    return out


def send_steps(r: redis.Redis, steps: Sequence[StepPayload], *, dispatch: Dispatcher,
               pipe: redis.client.Pipeline | None = None) -> None:
    """Send steps on from the core (signed "core"), each to the worker of its hop: one Redis round trip
    (after ``pipe``'s writes, if given), then one Celery message per worker that was idle. Never waits."""
    if not steps:
        return
    answers = inbox.deliver(pipe if pipe is not None else r.pipeline(transaction=False),
                            bundles(steps, sender=auth.CORE, key=auth.core_signing_key()), dispatch=dispatch)
    failed = [a for a in answers if isinstance(a, Exception)]
    if failed:
        raise failed[0]


def reroute_job(r: redis.Redis, job_id: str, lost: Sequence[str], *, dispatch: Dispatcher | None = None,
                now: float | None = None) -> bool:
    """Carry a running job on after ``lost`` workers of its route went silent: a new route over live workers
    (reusing as many of the old hops as a fewest-hop route allows), a new grant (epoch + 1, starting at the
    job's next step k), and the prompt plus the k published tokens replayed to the new hop 0 as one prefill
    (``_replay``). If no live worker holds the lost layers, they are ordered loaded on live workers with room
    (the surviving hops kept) and the job waits for them, like a new job waits for its model (status
    ``queued``, on the model's waiting list, marked ``resume``): the user sees a pause. It fails at once only
    when no live worker can take the lost layers, or after the load deadline (the watchdog).

    Only the collector's thread calls this (it also publishes the job's steps, so the step read here is the
    job's). Returns True if the job was re-routed or waits for its layers."""
    dispatch = dispatch or get_dispatcher()
    now = time.time() if now is None else now
    job = _hash(r, job_id)
    if job.get("status") != "running" or not job.get("route"):
        return False
    old, step = job_route(job), int(job.get("step") or 0)
    model_id = job["model_id"]
    info = model_info(r, model_id)
    # A window of each span's holders, as a submit reads, and the old route's workers (to keep its warm
    # hops): a worker lost with many jobs re-routes each of them on the collector's thread, which publishes
    # every job's tokens (reading every holder cost it 16-20 ms a job at 1000 holders: ``bench/submit.py``).
    known, routes = routes_for(r, model_id, info.num_layers, avoid=lost, now=now,
                               per_span=directory.SUBMIT_PER_SPAN, also=[h.worker_id for h in old])
    _note_loss(r, job_id, job, lost, now=now)
    if routes.exists():
        return _replay(r, job_id, _closest(r, model_id, routes, old), lost=lost, dispatch=dispatch, now=now,
                       known=known)
    # No live holder: load the lost layers on workers with room and wait for them. Only what completes a
    # route now (the job waits for it); the spare copies are rebuilt afterwards by keep_placed.
    r.hset(keys.model(model_id), PLACED, str(get_settings().copies))
    try:
        orders = place(r, model_id, spares=False, copies=1, dispatch=dispatch)
    except AzuError as exc:
        orders = []
        log.warning("job %s: cannot place %s: %s", job_id, model_id, exc.message)
    if not orders and not r.exists(keys.loading(model_id)) and not get_settings().step_deadline_s:
        fail_job(r, job_id, lost_reason(lost, step, model_id), dispatch=dispatch)
        return False
    # Nowhere to load it now: the job still waits, up to the step deadline, for a worker to come back or
    # free room (a supervisor restarting the lost worker, say); keep_placed places the span as soon as it
    # can, and the watchdog (recover_lost) fails the job with this reason when the deadline passes.
    pipe = r.pipeline()
    pipe.hset(keys.job(job_id), mapping={"status": "queued", "resume": "1", "updated": str(now)})
    pipe.zadd(keys.waiting(model_id), {job_id: now})
    pipe.execute()
    log.warning("job %s: worker(s) %s lost at step %d; waits for %s to be loaded again (%s)", job_id,
                ", ".join(sorted(lost)), step, model_id, ", ".join(f"{o.worker_id} {o.span}" for o in orders)
                or "orders in flight")
    # The loads may already be done (on the holders only: placement's workers were read just now).
    start_waiting_jobs(r, model_id, dispatch=dispatch, whole=False)
    return True


def lost_reason(lost: Sequence[str], step: int, model_id: str) -> str:
    return (f"worker(s) {', '.join(sorted(lost))} lost at step {step} and no live worker holds or can load "
            f"their layers of {model_id}")


def _note_loss(r: redis.Redis, job_id: str, job: dict[str, str], lost: Sequence[str], *, now: float) -> None:
    """Record the loss in the job's history (what the route was, how long it had been silent)."""
    history = json.loads(job.get("reroutes") or "[]")
    history.append({"epoch": int(job.get("epoch") or 0) + 1, "step": int(job.get("step") or 0),
                    "lost": sorted(lost), "at": now,
                    "stalled_s": round(now - float(job.get("updated") or now), 3),
                    "old_route": json.loads(job["route"])})
    r.hset(keys.job(job_id), "reroutes", json.dumps(history))


def _closest(r: redis.Redis, model_id: str, routes: placement.Routes, old: Sequence[Hop]) -> list[Hop]:
    """Of the fewest-hop routes, one keeping the most of ``old``'s hops (their workers are warm), in turn."""
    route = routes.pick(int(r.incr(keys.turn(model_id))), keep=old)
    assert route is not None  # the caller found routes
    return route


def _replay(r: redis.Redis, job_id: str, route: list[Hop], *, lost: Sequence[str] = (),
            dispatch: Dispatcher, now: float | None = None, known: directory.Snapshot | None = None) -> bool:
    """Move the job to ``route`` at its next step k: a new grant (epoch + 1, start k), the prompt and the k
    published tokens replayed to hop 0 as one prefill from position 0. Every hop drops its caches of older
    epochs when the new epoch's first step comes, and step k is sampled with the job's seed: the tokens are
    those of a run without the fault. The old route's other workers are told to drop the old epoch."""
    now = time.time() if now is None else now
    job = _hash(r, job_id)
    old, epoch, step = job_route(job), int(job.get("epoch") or 0), int(job.get("step") or 0)
    model_id = job["model_id"]
    entries: Any = r.xrange(keys.events(job_id))
    published = [int(keys.as_str(f[b"t"])) for _id, f in entries if f.get(b"t")]
    if len(published) != step:
        fail_job(r, job_id, f"job record inconsistent at re-route ({len(published)} tokens, step {step})",
                 dispatch=dispatch)
        return False
    sampling = Sampling.from_dict(json.loads(job["gen"]))
    try:
        grant, grant_sig = make_grant(r, job_id, model_id, route, sampling, epoch=epoch + 1, start=step,
                                      now=now, known=known)
    except AzuError as exc:
        fail_job(r, job_id, exc.message, dispatch=dispatch)
        return False
    r.hset(keys.job(job_id), mapping={
        "status": "running", "route": json.dumps([h.to_list() for h in route]), "grant": grant,
        "grant_sig": grant_sig, "epoch": str(epoch + 1), "updated": str(now)})
    r.hdel(keys.job(job_id), "resume")
    prompt = json.loads(job["prompt_ids"])
    replay = StepPayload(job_id=job_id, step=step, hop=0, pos=0, x=[*prompt, *published], grant=grant,
                         grant_sig=grant_sig)
    send_steps(r, [replay], dispatch=dispatch)
    # The old route's live workers that the new one does not use free the old epoch's caches (those it
    # does use drop them when the new epoch's first step comes).
    gone = [h for h in old if h.worker_id not in lost and h.worker_id not in {x.worker_id for x in route}]
    if gone:
        end_caches(r, job_id, gone, epoch=epoch, dispatch=dispatch)
    log.warning("job %s: re-routed at step %d (epoch %d) over %s", job_id, step, epoch + 1,
                [h.worker_id for h in route])
    return True


def start_waiting_jobs(r: redis.Redis, model_id: str, *, dispatch: Dispatcher | None = None,
                       whole: bool = True) -> int:
    """Start the jobs waiting for ``model_id`` if live workers now hold a complete route. Returns how many.
    A job that lost a worker mid-answer and waited for its layers (``resume``) carries on where it was
    (``_replay``), on the route that keeps most of its old hops.

    Under a per-model lock: two workers finishing their loads at once must not both miss the route
    (each seeing only its own part) nor both start the same job. The holders are read as a submit reads
    them (a window of each span's, every holder where those make no route), again each time the model's
    turn counter moves the windows on, so many waiting jobs spread over the holders as submits do; a
    resumed job's read also takes its old route's workers, to keep its warm hops. ``whole=False``: on the
    model's holders only (``routes_for``).
    """
    if not r.zcard(keys.waiting(model_id)) and not loading_in_flight(r, model_id):
        return 0
    # (With no job waiting, a route still ends the loads in flight: new jobs do not wait for them.)
    dispatch = dispatch or get_dispatcher()
    started = 0
    with r.lock(keys.start_lock(model_id), timeout=30, blocking_timeout=30):
        info = model_info(r, model_id)
        per_span = directory.SUBMIT_PER_SPAN
        known, routes = routes_for(r, model_id, info.num_layers, per_span=per_span, whole=whole)
        if not routes.exists():
            return 0
        queued: list[tuple[Any, float]] = r.zrange(keys.waiting(model_id), 0, -1,  # type: ignore[assignment]
                                                   withscores=True)
        for raw, since in queued:
            job_id = keys.as_str(raw)
            if not r.zrem(keys.waiting(model_id), job_id):
                continue
            state: list[Any] = r.hmget(keys.job(job_id), "status", "resume", "route")  # type: ignore[assignment]
            if keys.as_str(state[0] or b"") != "queued":
                continue  # cancelled or failed while waiting
            old = route_from_list(json.loads(state[2])) if state[1] and state[2] else ()
            turn = int(r.incr(keys.turn(model_id)))
            try:
                if not old and known.sampled and turn // per_span != known.turn // per_span:
                    known, routes = routes_for(r, model_id, info.num_layers, per_span=per_span, whole=whole)
                # A resumed job reads with its old workers, alone: the next jobs' windows stay as they are.
                its_known, its_routes = (routes_for(r, model_id, info.num_layers, per_span=per_span,
                                                    also=[h.worker_id for h in old], whole=whole)
                                         if old else (known, routes))
            except BaseException:
                r.zadd(keys.waiting(model_id), {job_id: since})  # not lost off every list
                raise
            if not its_routes.exists():  # lost since: it waits on, and the loads stay in flight
                r.zadd(keys.waiting(model_id), {job_id: since})
                return started
            route = its_routes.pick(turn, keep=old)  # a resumed job: a fewest-hop route keeping most hops
            assert route is not None
            if state[1]:
                _replay(r, job_id, route, dispatch=dispatch, known=its_known)
            else:
                start_job(r, job_id, route, dispatch=dispatch, known=its_known)
            started += 1
        r.delete(keys.loading(model_id))
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
def route_usage(route: Sequence[Hop], *, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Usage as the core counts it: the prompt through every hop's layers, then each fed-back token (every
    published token but the last) through them too. Nothing a worker says enters it.

    After a re-route ``route`` is the job's last route: the route that delivered the answer is paid for all
    of it (it computed exactly this: its replay prefilled the prompt and the tokens published before, then it
    decoded the rest), so the user is charged what a run without the fault costs, once. The work a broken
    route did before the loss is not paid (docs/reliability.md)."""
    tokens = prompt_tokens + completion_tokens - 1 if completion_tokens > 0 else 0
    workers: dict[str, int] = {}
    for h in route:
        workers[h.worker_id] = workers.get(h.worker_id, 0) + token_layers(tokens, h.span.num_layers)
    workers = {w: n for w, n in workers.items() if n > 0}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "token_layers": sum(workers.values()), "workers": workers}


def job_route(job: dict[str, str]) -> tuple[Hop, ...]:
    return route_from_list(json.loads(job["route"])) if job.get("route") else ()


def usage_of(job: dict[str, str]) -> dict[str, Any]:
    """The usage of a job (its record as text) from its route and the steps the core published so far."""
    prompt_len = int(json.loads(job.get("gen") or "{}").get("prompt_len", 0))
    return route_usage(job_route(job), prompt_tokens=prompt_len, completion_tokens=int(job.get("step") or 0))


def end_record(job_id: str, *, status: str, reason: str, usage: dict[str, Any]) -> tuple[str, bytes]:
    """The end-of-job record the scheduler bills from, and the core's signature of it."""
    record = json.dumps({"job_id": job_id, "status": status, "reason": reason, "usage": usage},
                        sort_keys=True)
    return record, auth.sign(auth.core_signing_key(), auth.END_RECORD, record.encode())


def close(pipe: Any, job_id: str, *, status: str, reason: str, usage: dict[str, Any],
          fields: dict[str, str] | None = None) -> None:
    """The end-of-job write every ending shares: final fields with the signed end record, off the active list,
    keys expire."""
    now = str(time.time())
    record, sig = end_record(job_id, status=status, reason=reason, usage=usage)
    pipe.hset(keys.job(job_id), mapping={
        "status": status, "finish_reason": reason, "usage": json.dumps(usage), "end": record, "end_sig": sig,
        "updated": now, "finished": now, **(fields or {})})
    pipe.zrem(keys.ACTIVE_JOBS, job_id)
    for k in (keys.job(job_id), keys.events(job_id)):
        pipe.expire(k, keys.JOB_TTL_S)


def end_caches(r: redis.Redis, job_id: str, route: Sequence[Hop], *, epoch: int = 0,
               dispatch: Dispatcher) -> None:
    """Tell every hop's worker the job is over: an order signed by the core, in its inbox like a step (a
    busy worker takes it between batches; an idle one is woken for it). Not on the control queue: a worker
    ends its session to let a control message through, a pause of several round trips for the other jobs
    it is running (bench/latency.py)."""
    sig = auth.sign(auth.core_signing_key(), auth.END_ORDER, end_order_part(job_id, epoch))
    order = EndOrder(job_id=job_id, epoch=epoch, sig=sig).pack()
    inbox.deliver(r.pipeline(transaction=False), dict.fromkeys(sorted({h.worker_id for h in route}), order),
                  dispatch=dispatch)


def fail_job(r: redis.Redis, job_id: str, reason: str, *, dispatch: Dispatcher | None = None) -> bool:
    """Mark the job failed with ``reason`` (once), tell the client, bill it, free the caches."""
    dispatch = dispatch or get_dispatcher()
    key = keys.job(job_id)
    job = _hash(r, job_id)
    if not job or job.get("status") in ("done", "failed"):
        return False
    # Claim the transition: only one of (watchdog, collector, cancel) records the failure.
    if not r.hsetnx(key, "failed_claim", "1"):
        return False
    pipe = r.pipeline()
    pipe.xadd(keys.events(job_id), {"k": "error", "error": reason}, id="0-*")
    close(pipe, job_id, status="failed", reason="error", usage=usage_of(job), fields={"error": reason})
    pipe.execute()
    send_settle(job_id, dispatch=dispatch)
    if job.get("route"):
        end_caches(r, job_id, job_route(job), epoch=int(job.get("epoch") or 0), dispatch=dispatch)
    return True


def cancel_job(r: redis.Redis, job_id: str, *, dispatch: Dispatcher | None = None) -> None:
    """Ask the job to stop: the collector ends it at its next token; a job still waiting ends now."""
    key = keys.job(job_id)
    status = keys.as_str(r.hget(key, "status") or b"")
    if not status or status in ("done", "failed"):
        return
    r.hset(key, "cancel", "1")
    if status == "queued":
        model_id = keys.as_str(r.hget(key, "model_id") or b"")
        if r.zrem(keys.waiting(model_id), job_id) and r.hsetnx(key, "failed_claim", "1"):
            job = _hash(r, job_id)
            # A job that lost a worker mid-answer and waits for its layers has tokens: they are charged.
            usage = (usage_of(job) if job.get("resume")
                     else route_usage((), prompt_tokens=0, completion_tokens=0))
            pipe = r.pipeline()
            pipe.xadd(keys.events(job_id), {"k": "done", "reason": "cancelled", "usage": json.dumps(usage)},
                      id="0-*")
            close(pipe, job_id, status="done", reason="cancelled", usage=usage)
            pipe.execute()
            send_settle(job_id, dispatch=dispatch)
            if job.get("resume") and job.get("route"):
                end_caches(r, job_id, job_route(job), epoch=int(job.get("epoch") or 0),
                           dispatch=dispatch or get_dispatcher())


# --- billing ------------------------------------------------------------------------------------
def signed_end(job: dict[str, str]) -> dict[str, Any] | None:
    """The job's end record if the core signed it (None if there is none or it is not the core's)."""
    record, sig = job.get("end"), job.get("end_sig")
    if not record or sig is None:
        return None
    try:
        auth.check(auth.public_hex(auth.core_signing_key()), auth.END_RECORD, record.encode(),
                   sig if isinstance(sig, bytes) else sig.encode("latin-1"), what="end record")
    except AzuError:
        return None
    end: dict[str, Any] = json.loads(record)
    return end


def bill_ended_job(r: redis.Redis, job_id: str, *, billing: Billing) -> str:
    """Charge an ended job's usage (workers credited per token-layer) or release its hold; once per job.

    Bills only from the core's signed end record (not from a status or usage anyone else could write).
    Returns what happened: "settled", "released", "already settled", "not finished" or "unknown".
    """
    job = _hash_raw(r, job_id)
    if not job:
        return "unknown"
    if job.get("settled"):
        return "already settled"
    end = signed_end(job)
    if end is None or end.get("job_id") != job_id or end.get("status") not in ("done", "failed"):
        return "not finished"
    workers = {w: int(n) for w, n in end["usage"]["workers"].items() if int(n) > 0}
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
        usage = usage_of(job)
    return JobView(job_id=job_id, status=status, user_id=job.get("user_id", ""), model_id=job["model_id"],
                   token_ids=tokens, finish_reason=finish_reason, usage=usage, error=job.get("error") or None,
                   prompt_tokens=len(json.loads(job.get("prompt_ids") or "[]")),
                   created_at=float(job.get("created") or 0.0), stop=list(sampling.stop))
