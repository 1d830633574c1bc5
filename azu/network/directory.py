"""Live workers, from their heartbeats in Redis.

The collector (a core process) writes a worker's record (``azu:worker:<id>``, JSON) and its last heartbeat
time (``azu:workers`` sorted set) from the worker's signed heartbeat report, every few seconds; the worker
itself writes neither. Only spans the core ordered the worker to load (``azu:assigned:<id>``) count as held.
A worker whose heartbeat is older than the heartbeat TTL (``AZU_HEARTBEAT_TTL_S``) is
not live: it gets no new routes and no load orders. Nothing here needs the worker to say goodbye; a crash
just stops the heartbeats.

A worker the core found silent on a running job's route (azu.network.watchdog.recover_lost) is marked
*lost* (``azu:lost``, a sorted set: worker id -> when) and is not live from that moment, whatever its last
heartbeat says, until a heartbeat from a process started after the mark (a restart) or ``LOST_HOLD_S``.

Each model has an index of its holders (``azu:model:<id>:holders``), written with the records: a job's
submit reads those workers only (``snapshot(model_id=...)``), however many others are live. The room each
worker reports is indexed too (``azu:room``): placement reads a model's holders and the roomiest others
(``snapshot(roomiest=...)``), not every live worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from azu.config import get_settings
from azu.engine.span import Span
from azu.errors import InvalidRequest, shown
from azu.network import keys

log = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    worker_id: str
    queue: str
    device: str  # GPU name, or "cpu"
    total_memory: int  # bytes the worker offers
    free_memory: int  # bytes still free for more layers
    p2p_url: str | None = None
    wallet: str | None = None
    stages: list[tuple[str, Span]] = field(default_factory=list)  # (model id, span) of each held stage
    cached_jobs: int = 0  # jobs whose KV caches this worker holds now
    started_at: float = 0.0
    heartbeat_at: float = 0.0

    def holds(self, model_id: str) -> list[Span]:
        return [span for m, span in self.stages if m == model_id]

    def to_json(self) -> str:
        d = asdict(self)
        d["stages"] = [[model_id, *span.to_list()] for model_id, span in self.stages]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        d: dict[str, Any] = json.loads(raw)
        stages = []
        for s in d.get("stages", []):
            if not isinstance(s, list) or not s or not isinstance(s[0], str):
                raise InvalidRequest(f"malformed held stage {shown(s)} in a worker record")
            stages.append((s[0], Span.from_list(s[1:])))
        d["stages"] = stages
        return cls(**d)


# A submit reads at most this many live holders of each span its model is held in (``snapshot``'s
# ``per_span``), so its time and Redis's do not grow with the holders: a model 1000 workers held cost every
# submit 13-36 ms and Redis 3-6 ms of its one thread (``bench/submit.py``). Every span is read, so the
# fewest-hop routes of every holder are among the windows' (a span few hold is read whole); a window serves
# that many consecutive jobs, each holder of it one, then the next comes, so jobs spread about evenly over
# every holder (ranks move with heartbeats). Where the windows make no route (their holders lost since),
# every holder is read (``jobs.routes_for``). A model cut into many spans costs a window each.
SUBMIT_PER_SPAN = 16


# Placement (a model no live route serves, its spare copies) plans over the model's holders and at most this
# many of the roomiest other live workers (``snapshot(roomiest=...)``), not over every live worker: the first
# job of a model nobody held read each live worker's record three times, and a worker lost with its span's
# only copy did so for each of its jobs on the collector's thread. Placement takes the roomiest first and
# cuts a copy into as few spans as fit (``placement.plan_loads``), and a route has at most 16 hops: a copy
# needs no worker past the roomiest few dozen. Where the room index gives fewer, every live worker is read.
PLACE_ROOMIEST = 64
ROOM_SCORE_MAX = 2**53  # a room score is a double: larger claims count as this (exact up to here)


def span_name(span: Span) -> str:
    return keys.span_name(span.first, span.last, span.embeddings, span.head)


HOLDERS_KEEP_S = 3600.0  # a model index's entries not refreshed this long go (or twice the heartbeat TTL)
LOST = keys.LOST_WORKERS  # core-owned: workers marked lost (see the module docstring)
LOST_HOLD_S = 600.0  # a lost mark not cleared by a restart lapses after this long


def mark_lost(r: redis.Redis, worker_ids: list[str] | set[str], *, now: float | None = None) -> None:
    """The core found these workers silent on a job's route: no new routes for them from now on."""
    if not worker_ids:
        return
    now = time.time() if now is None else now
    pipe = r.pipeline()
    pipe.zadd(LOST, {w: now for w in worker_ids})
    pipe.zremrangebyscore(LOST, "-inf", now - LOST_HOLD_S)
    pipe.execute()


def lost_workers(r: redis.Redis, *, now: float | None = None) -> set[str]:
    """The workers whose lost mark stands."""
    now = time.time() if now is None else now
    found: list[Any] = r.zrangebyscore(LOST, now - LOST_HOLD_S, "+inf")  # type: ignore[assignment]
    return {keys.as_str(w) for w in found}


def _ttl(ttl: float | None) -> float:
    return get_settings().heartbeat_ttl_s if ttl is None else ttl


def register(r: redis.Redis, info: WorkerInfo, *, now: float | None = None) -> None:
    """Write the worker's record and heartbeat (also what every heartbeat does)."""
    register_many(r, [info], now=now)


def register_many(r: redis.Redis, infos: Sequence[WorkerInfo], *, now: float | None = None) -> None:
    """``register`` each of ``infos`` (the heartbeats of one batch of reports), in order: two round trips
    for them all, three if one was marked lost, instead of two or three each. A banned worker's record is
    written, but it leaves the models' indexes (its entries lapse)."""
    if not infos:
        return
    now = time.time() if now is None else now
    look = r.pipeline(transaction=False)
    for info in infos:
        look.zscore(LOST, info.worker_id)
        look.hexists(keys.BANNED, info.worker_id)
    looked = look.execute()
    marks: list[float | None] = looked[0::2]
    banned: list[bool] = looked[1::2]
    marked = sorted({info.worker_id for info, mark in zip(infos, marks, strict=True) if mark is not None})
    records = r.mget([keys.worker(w) for w in marked]) if marked else []
    before: dict[str, Any] = dict(zip(marked, records, strict=True))
    keep_from = now - max(HOLDERS_KEEP_S, 2 * _ttl(None))
    pipe = r.pipeline()
    indexes: dict[str, None] = {}  # the index keys written: trimmed once each for the batch, at the end
    held_spans: dict[str, set[str]] = {}  # model -> the spans held in the batch
    for info, mark, is_banned in zip(infos, marks, banned, strict=True):
        info.heartbeat_at = now
        pipe.set(keys.worker(info.worker_id), info.to_json())
        pipe.zadd(keys.WORKERS, {info.worker_id: now})
        # Its room, where placement looks for the roomiest workers (``snapshot(roomiest=...)``); a banned
        # worker is ordered nothing (an entry silent workers left goes when placement walks past it).
        if is_banned:
            pipe.zrem(keys.ROOM, info.worker_id)
        else:
            pipe.zadd(keys.ROOM, {info.worker_id: -min(info.free_memory, ROOM_SCORE_MAX)})
        # Each held model's index, with the record (a job's submit reads only that model's holders, so a
        # crowd of workers holding nothing does not slow it), and each held span's (a submit reads a window
        # of each span's holders: ``snapshot(per_span=...)``). A span dropped since stops being refreshed;
        # so does a banned worker's every span (it gets no route: it would take a place in the windows).
        spans = sorted({(m, span_name(span)) for m, span in info.stages}) if not is_banned else []
        for key in [*(keys.holders(m) for m in sorted({m for m, _name in spans})),
                    *(keys.span_holders(m, name) for m, name in spans)]:
            pipe.zadd(key, {info.worker_id: now})
            indexes[key] = None
        for m, name in spans:
            held_spans.setdefault(m, set()).add(name)
        # A new process under that id is not lost any more: one started after the mark, or one other than
        # the process the record showed (a supervisor may have started it before the core found the old one
        # silent).
        was = before.get(info.worker_id)
        other = was is not None and float(json.loads(was).get("started_at") or 0.0) != info.started_at
        if mark is not None and (info.started_at > mark or other):
            pipe.zrem(LOST, info.worker_id)
    for model_id, names in sorted(held_spans.items()):
        pipe.zadd(keys.held_spans(model_id), dict.fromkeys(sorted(names), now))
        indexes[keys.held_spans(model_id)] = None
    for key in indexes:  # entries of workers not heard from for an hour go; a key no heartbeat writes lapses
        pipe.zremrangebyscore(key, "-inf", keep_from)
        pipe.expire(key, keys.JOB_TTL_S)
    pipe.expire(keys.ROOM, keys.JOB_TTL_S)
    pipe.execute()


def deregister(r: redis.Redis, worker_id: str) -> None:
    pipe = r.pipeline()
    pipe.zrem(keys.WORKERS, worker_id)
    pipe.zrem(keys.ROOM, worker_id)
    pipe.delete(keys.worker(worker_id))
    pipe.execute()


@dataclass
class Snapshot:
    """The live workers with the public keys they enrolled (``azu:identity:<id>``, written by the core at
    enrollment), read in the same round trips: what a job's grant names for each hop."""

    workers: list[WorkerInfo]
    identities: dict[str, str]  # worker id -> public key (hex), for the live workers that have one
    sampled: bool = False  # windows of a model's holders (``snapshot(per_span=...)``), not every one
    turn: int = 0  # the model's turn counter the windows were read at (they move on every ``per_span``)

    def worker(self, worker_id: str) -> WorkerInfo | None:
        return next((w for w in self.workers if w.worker_id == worker_id), None)

    def keys_and_addresses(self, worker_ids: Sequence[str]) -> tuple[list[str], list[Any]] | None:
        """Each worker's enrolled key and direct-path address (as its record has it), or None unless this
        snapshot has both for every one of them."""
        by_id = {w.worker_id: w for w in self.workers}
        if not all(w in by_id and w in self.identities for w in worker_ids):
            return None
        return [self.identities[w] for w in worker_ids], [by_id[w].p2p_url for w in worker_ids]


def live_workers(r: redis.Redis, *, ttl: float | None = None, now: float | None = None) -> list[WorkerInfo]:
    """Workers whose last heartbeat is within ``ttl`` seconds (default: the heartbeat TTL), by worker id."""
    return snapshot(r, ttl=ttl, now=now).workers


# One round trip (a job's submit reads the directory on the way to its first token). KEYS[1]: whom to read,
# scored by last heartbeat: every worker (azu:workers), or one model's holders (its index, written with the
# records in the same transaction, so a holder heard from since ARGV[1] there is so in azu:workers too); less
# the lost (marked since ARGV[2]: a short list, the marks lapse) and the banned (a list that only grows:
# checked one by one, so the read costs what KEYS[1] holds). For each: its record, enrolled identity and the
# spans the core ordered it. The keys are the workers' own, named by the ids read here (ARGV[3-5]: their
# prefixes), so they cannot be declared up front: fine on one Redis, as azu runs it (not a cluster).
# ARGV[6] > 0 (a model's read, ``per_span``): not every holder, but at most that many live holders of each
# span the model is held in (KEYS[4]: its spans; their holders' keys are ARGV[7] .. span .. ARGV[8]), a
# window of the span's live holders, wrapping: a span's live holders are its last ranks (ordered by
# heartbeat), so the window costs O(log N + window) however many entries of silent workers the index still
# keeps (an hour's). The window moves on by its length every ``window`` turns of the model's counter
# (KEYS[5]), so ``Routes.pick(turn)`` takes each of its holders in turn before the next window comes (a
# window moved on every turn, with the pick moving within it, had taken 16 of 256 holders for every job).
# ARGV[10..] (with a window): holders read whatever the windows hold, if live (a re-routed job's surviving
# hops, whose workers hold its caches and are kept where a fewest-hop route allows).
# ARGV[9] > 0 (a model's read for placement, ``roomiest``): every live holder, and that many of the roomiest
# other live workers (KEYS[6], scored by minus the bytes each has free: its first ranks are the roomiest, ties
# by id, as placement ranks them; liveness is KEYS[7]'s), walked from the first rank past the lost, the
# banned and the workers ARGV[10..]; an entry of a worker not live is removed as it is passed (its next
# heartbeat writes it again: so ARGV[1] must be no later than the collector's liveness), so silent workers
# cost one walk each, not every walk for an hour. ARGV[10..]
# (the workers of the model's load orders) are read too, if live, not counted among the roomiest: placement
# reads whether they are still live, and a worker whose load failed takes no place among the roomiest.
# Where the walk finds fewer than that many (a network that small; more entries passed than 8 times that
# many and 256 besides the holders and ARGV[10..]; an index not written yet: a collector of a version before
# it, a lost key), every live worker is read instead, so placement never sees less than the whole directory
# would give.
# Returns whether it read fewer than every holder (some span held by more than the window, or no span index:
# a collector of a version before it; for placement: whether the roomiest left any worker out), the rows,
# and the turn the windows were read at.
_READ = """
local out = {}
local lost = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '+inf')) do lost[id] = true end
local ids, seen = {}, {}
local function add(id)
  if not seen[id] then
    seen[id] = true
    ids[#ids + 1] = id
  end
end
local function add_also(index)  -- ARGV[10..], each if live in index
  for i = 10, #ARGV do
    local at = redis.call('ZSCORE', index, ARGV[i])
    if at and tonumber(at) >= tonumber(ARGV[1]) then add(ARGV[i]) end
  end
end
local window = tonumber(ARGV[6])
local roomiest = tonumber(ARGV[9])
local sampled = 0
local turn = 0
if window > 0 then
  turn = math.floor(tonumber(redis.call('GET', KEYS[5]) or '0') or 0)
  local spans = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[1], '+inf')
  if #spans == 0 then sampled = 1 end
  for _, span in ipairs(spans) do
    local key = ARGV[7] .. span .. ARGV[8]
    local live = redis.call('ZCOUNT', key, ARGV[1], '+inf')
    local members = {}
    if live <= window then
      members = redis.call('ZRANGEBYSCORE', key, ARGV[1], '+inf')
    else
      sampled = 1
      local first = redis.call('ZCARD', key) - live
      local at = (math.floor(turn / window) * window) % live
      local stop = math.min(at + window, live) - 1
      members = redis.call('ZRANGE', key, first + at, first + stop)
      if at + window > live then
        for _, id in ipairs(redis.call('ZRANGE', key, first, first + at + window - live - 1)) do
          members[#members + 1] = id
        end
      end
    end
    for _, id in ipairs(members) do add(id) end
  end
  if #spans > 0 then add_also(KEYS[1]) end  -- (no span index: every holder is read next anyway)
else
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do add(id) end
end
if roomiest > 0 then
  local asked = {}
  for i = 10, #ARGV do asked[ARGV[i]] = true end
  local taken, at, limit, silent = 0, 0, roomiest * 8 + 256 + #ids + (#ARGV - 9), {}
  while taken < roomiest and at < limit do
    local chunk = redis.call('ZRANGE', KEYS[6], at, at + roomiest - 1)
    at = at + #chunk
    for _, id in ipairs(chunk) do
      local beat = tonumber(redis.call('ZSCORE', KEYS[7], id) or '0')
      if beat < tonumber(ARGV[1]) then
        silent[#silent + 1] = id
      elseif taken < roomiest and not seen[id] and not asked[id] and not lost[id]
          and redis.call('HEXISTS', KEYS[3], id) == 0 then
        add(id)
        taken = taken + 1
      end
    end
    if #chunk < roomiest then break end
  end
  for i = 1, #silent, 1000 do  -- (unpack takes a few thousand at most)
    redis.call('ZREM', KEYS[6], unpack(silent, i, math.min(i + 999, #silent)))
  end
  if taken < roomiest then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], ARGV[1], '+inf')) do add(id) end
  else
    sampled = 1
    add_also(KEYS[7])
  end
end
for _, id in ipairs(ids) do
  if not lost[id] and redis.call('HEXISTS', KEYS[3], id) == 0 then
    out[#out + 1] = {id, redis.call('GET', ARGV[3] .. id), redis.call('GET', ARGV[4] .. id),
                     redis.call('SMEMBERS', ARGV[5] .. id)}
  end
end
return {sampled, out, turn}
"""


def snapshot(r: redis.Redis, *, model_id: str | None = None, ttl: float | None = None,
             now: float | None = None, per_span: int = 0, roomiest: int = 0,
             also: Sequence[str] = ()) -> Snapshot:
    """``live_workers`` with their enrolled identities, all in one round trip (a job's grant then needs no
    read of its own). Lost workers are left out until they restart; banned ones (failed verification,
    azu.verification) for good.

    ``model_id``: only the live workers holding a span of that model (what its routes and grants need), read
    from the model's index: the read costs what the model's holders are, however many other workers there
    are.

    ``per_span`` (with ``model_id``): at most that many live holders of each span of the model, a window
    that moves on with the model's turn counter (what a submit reads: ``SUBMIT_PER_SPAN``); the snapshot
    says whether that left any holder out (``sampled``). ``also`` (with ``per_span``): holders read as well,
    wherever the windows are, if live (a re-routed job's surviving hops: ``jobs.reroute_job``); not where
    the model has no span index, whose read is followed by every holder's.

    ``roomiest`` (with ``model_id``, not ``per_span``): every live holder of the model and that many of the
    roomiest other live workers (by the room their last heartbeat reported): whom placement plans over
    (``PLACE_ROOMIEST``), or every live worker where the room index gives fewer (a small network, an index
    not written yet); ``also`` here: live workers read as well, not counted among the roomiest (the workers
    of the model's load orders). Entries of workers not live by ``ttl`` at ``now`` leave the room index as
    the read passes them: a read for placement takes the collector's TTL and the time as it is."""
    now = time.time() if now is None else now
    prefixes = keys.worker(""), keys.identity(""), keys.assigned("")
    among = keys.WORKERS if model_id is None else keys.holders(model_id)
    window = max(0, int(per_span)) if model_id is not None else 0
    room = max(0, int(roomiest)) if model_id is not None and not window else 0
    spans, turn, first = ((keys.held_spans(model_id), keys.turn(model_id), keys.span_holders_prefix(model_id))
                          if model_id is not None else (among, among, ""))
    sampled, rows, turn_read = r.eval(  # type: ignore[misc]
        _READ, 7, among, LOST, keys.BANNED, spans, turn, keys.ROOM, keys.WORKERS,  # type: ignore[arg-type]
        now - _ttl(ttl), now - LOST_HOLD_S, *prefixes, window, first, keys.SPAN_HOLDERS_SUFFIX, room,
        *(sorted(set(also)) if window or room else ()))
    out = []
    known: dict[str, str] = {}
    for raw_id, raw, public_key, spans in rows:
        worker_id = keys.as_str(raw_id)
        if not raw:
            continue
        try:  # one record the collector should never have written must not stop every submit
            info = WorkerInfo.from_json(raw)
        except (InvalidRequest, ValueError, TypeError, AttributeError) as exc:
            log.warning("worker %s: unreadable directory record left out (%s)", worker_id, shown(str(exc)))
            continue
        if info.worker_id != worker_id:  # keys, marks and orders are the id's: so must its record be
            log.warning("worker %s: directory record names %s; left out", worker_id, shown(info.worker_id))
            continue
        # Held only if the core ordered it (a record claiming more is not believed).
        allowed = {keys.as_str(s) for s in spans}
        info.stages = [(m, span) for m, span in info.stages
                       if json.dumps([m, *span.to_list()]) in allowed]
        if model_id is not None and not room and not info.holds(model_id):
            continue  # dropped it since (its index entry lapses with the heartbeat TTL)
        out.append(info)
        if public_key:
            known[worker_id] = keys.as_str(public_key)
    return Snapshot(sorted(out, key=lambda w: w.worker_id), known, sampled=bool(sampled), turn=int(turn_read))


def get_worker(r: redis.Redis, worker_id: str) -> WorkerInfo | None:
    raw = r.get(keys.worker(worker_id))
    return WorkerInfo.from_json(raw) if raw else None


def is_live(r: redis.Redis, worker_id: str, *, ttl: float | None = None, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    score = r.zscore(keys.WORKERS, worker_id)
    return score is not None and score >= now - _ttl(ttl) and worker_id not in lost_workers(r, now=now)
