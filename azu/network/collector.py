"""The collector: the core loop that turns workers' signed reports into facts.

Workers write none of the facts users and the ledger read. Each worker RPUSHes signed ``Report``s onto its
own list, ``azu:reports:from:<id>`` (its login may push nowhere else); this loop (a core process: ``python -m
azu.cli.processes collector``, or a thread of the scheduler) takes a share of each list that holds reports
each round (azu.network.reports: a worker's flood delays its own reports), checks each signature against the
sender's enrolled identity (``azu:identity:<id>``) and the sender's right to say it, then acts:

- ``token`` (only from the job's last hop, as the core-signed route says; only the job's next step): publish
  the event (id ``0-<step+1>``, so a replay is refused by Redis), advance the job, and decide the end itself
  (stop ids, stop strings with the core's tokenizer, max_tokens, cancel). On the end: the done event with the
  usage the core computes (route x published tokens), the signed end record, an end order in every hop's
  inbox, and settlement on ``core``. The last hop hands the next step to hop 0 itself: the collector is not
  on the decode loop.
- ``heartbeat`` (about the sender only): the directory record, keeping only the spans the core ordered the
  worker to load (``azu:assigned:<id>``): a claim of spans never ordered is ignored. A batch's heartbeats are
  written together (three round trips for them all), before any later report of another kind.
- ``loaded`` / ``load_failed``: start, or fail, the jobs waiting for the model.
- ``job_failed`` (only from a hop of the job's route): fail the job.
- ``refused``: count it (``azu:refused:<id>``). ``pong``: write the health-check key (``azu:ping:*``).
- ``commit`` (only from the hop of the job's current route it names): keep the signed commitment, the first
  one per chunk (azu.verification); ``evidence``: keep the signed bundles a hop sent on the verifier's order.
  When a job ends, the collector picks it for a check or not (azu.verification.selection).

One collector acts at a time (a lease on ``azu:collector:lock``), so a job's reports are handled in the order
its last hop sent them. Between batches, about once a second, the loop also re-routes the running jobs that
lost a worker (azu.network.watchdog.recover_lost): the thread that publishes a job's steps is the one that
moves it to a new route, so the two never race.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from azu import metrics
from azu.config import Settings, get_settings
from azu.engine.span import Span
from azu.errors import AzuError, Forbidden, InvalidRequest, shown
from azu.network import auth, directory, jobs, keys, reports, watchdog
from azu.network.dispatch import Dispatcher, get_dispatcher, send_settle, worker_queue
from azu.network.wire import Report, Sampling
from azu.verification import selection
from azu.verification.commitment import CHUNK, TOP_K, shape_of

log = logging.getLogger(__name__)

BATCH_MAX = reports.BATCH_MAX  # token reports kept at once before their tokens are published
RECENT_S = 10.0  # a last hop whose token was published this recently has its list looked at first each round
RECENT_MAX = 256  # ... the latest this many
MAX_FIELD = 256  # characters of a heartbeat's text fields (device, P2P address, wallet)
MAX_STAGES = 256  # stages a heartbeat may claim (a worker holds a span or two of a model or two)
MAX_TOKEN_REPORT = 4096  # bytes: a token report names a worker, a job (<= 128 characters) and three numbers
LEASE_S = 10
LEASE_RENEW_S = 1.0  # the loop renews its lease this often (a pop waits wait_s at most before it renews)
# Take the lease if free, or renew it if this collector holds it: 1 if held now, else 0 (one round trip).
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]); return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]); return 1 end
return 0
"""


@dataclass
class _Decoder:
    """A job's stop-string state: the stream decoder and the step it has seen up to."""

    decoder: Any
    steps: int


class Collector:
    """Report handling with what it remembers between batches (identities, stop-string decoders)."""

    def __init__(self, r: redis.Redis, *, dispatch: Dispatcher | None = None,
                 verify_queue: str = keys.VERIFY_QUEUE) -> None:
        self.r = r
        self._dispatch = dispatch
        self.verify_queue = verify_queue  # where ended jobs picked for a check go (azu.verification)
        self.identities: dict[str, str] = {}
        self.decoders: dict[str, _Decoder] = {}
        self.tokenizers: dict[str, Any] = {}
        self.tally = metrics.Tally()  # this batch's report counts, written with its tokens or at its end
        # This batch's heartbeats, checked, not yet written: each worker's last (it overwrites the others).
        self.beats: dict[str, directory.WorkerInfo] = {}
        # Last hops whose tokens were published lately, by when: each round looks at their lists first, hint
        # or not (a flood of hints, or of identities, must not hold back a job's tokens). Only the core's
        # own acceptance puts a worker here: a token is accepted only from a running job's last hop.
        self.recent: dict[str, float] = {}

    def recent_senders(self, now: float | None = None) -> list[str]:
        """The workers whose tokens were published in the last ``RECENT_S``, latest first (at most
        ``RECENT_MAX``)."""
        now = time.monotonic() if now is None else now
        self.recent = {w: at for w, at in self.recent.items() if now - at < RECENT_S}
        return sorted(self.recent, key=self.recent.__getitem__, reverse=True)[:RECENT_MAX]

    @property
    def dispatch(self) -> Dispatcher:
        if self._dispatch is None:
            self._dispatch = get_dispatcher()
        return self._dispatch

    # --- checking ----------------------------------------------------------------------------------
    def _identity(self, worker_id: str) -> str | None:
        key = self.identities.get(worker_id)
        if key is None:
            raw = self.r.get(keys.identity(worker_id))
            if raw:
                key = self.identities[worker_id] = keys.as_str(raw)
        return key

    def verify(self, blob: bytes, *, sender: str | None = None) -> Report:
        """The report in ``blob`` if it is well formed and signed by its worker's identity; else raises.
        ``sender``: the worker whose own list it came from (Redis let only that worker's login push there)."""
        rep = Report.unpack(blob)
        if sender is not None and rep.worker_id != sender:
            raise Forbidden(f"report in {sender}'s list names worker {rep.worker_id[:64]!r}")
        key = self._identity(rep.worker_id)
        if key is None:
            raise Forbidden(f"report from {rep.worker_id}: no enrolled identity")
        auth.check(key, auth.REPORT, rep.signed_part(), rep.sig, what=f"report from {rep.worker_id}")
        return rep

    # --- the batch ---------------------------------------------------------------------------------
    def process(self, blobs: Sequence[bytes], *, senders: Sequence[str] | None = None) -> int:
        """Handle ``blobs`` (packed reports) in order. Returns how many were accepted. ``senders``: for each,
        the worker whose own list it was taken from (a report there in another's name is refused).

        One pass: each report is parsed, checked and handled before the next is read. Token reports are kept
        until the batch's tokens are published together (BATCH_MAX at most at once), and heartbeats as the
        records they make, written together (``_write_heartbeats``): both small (a batch of a thousand large
        reports, each parsed and kept until the end, would hold them all at once)."""
        accepted = 0
        tokens: list[Report] = []
        for i, blob in enumerate(blobs):
            try:
                rep = self.verify(blob, sender=senders[i] if senders is not None else None)
            except AzuError as exc:
                log.warning("report refused: %s", exc.message[:500])  # it may quote what a stranger sent
                self.tally.add(metrics.CORE_REPORTS, kind="unverified", outcome="refused")
                continue
            if rep.kind == "token" and len(blob) > MAX_TOKEN_REPORT:
                log.warning("token report from %s refused: %d bytes", rep.worker_id, len(blob))
                self.tally.add(metrics.CORE_REPORTS, kind="token", outcome="refused")
                continue
            accepted += 1
            if rep.kind == "token":
                tokens.append(rep)  # small (above), and at most BATCH_MAX of them kept
                if len(tokens) >= BATCH_MAX:
                    self._tokens(tokens)
                    tokens = []
                continue
            # Keep the order: tokens and heartbeats before a later report (a job_failed after the tokens, a
            # "loaded" after the heartbeat that shows the span held). A heartbeat touches nothing a token
            # report reads: the two wait side by side.
            if rep.kind != "heartbeat":
                if tokens:
                    self._tokens(tokens)
                    tokens = []
                if self.beats:
                    self._write_heartbeats()
            outcome = "accepted"
            try:
                self._HANDLERS[rep.kind](self, rep)
            except AzuError as exc:
                outcome = "refused"
                log.warning("%s report from %s refused: %s", rep.kind, rep.worker_id[:64], exc.message[:500])
            except Exception:
                outcome = "error"
                log.exception("%s report from %s failed", rep.kind, rep.worker_id)
            self.tally.add(metrics.CORE_REPORTS, kind=rep.kind, outcome=outcome)
        if tokens:
            self._tokens(tokens)
        if self.beats:
            self._write_heartbeats()
        self.tally.flush(self.r)
        return accepted

    # --- tokens ------------------------------------------------------------------------------------
    def _tokens(self, reports: list[Report]) -> None:
        # A malformed report is dropped alone: it must not cost the other jobs in the batch their tokens.
        reports = [rep for rep in reports if isinstance(rep.body.get("job_id"), str) and rep.body["job_id"]]
        ids = list(dict.fromkeys(rep.body["job_id"] for rep in reports))
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        states = {j: jobs.job_fields(raw) for j, raw in zip(ids, pipe.execute(), strict=True)}
        pipe = self.r.pipeline(transaction=False)
        ended: list[tuple[str, dict[str, str]]] = []
        now = str(time.time())
        for rep in reports:
            job_id = _text(rep.body.get("job_id"))
            job = states.get(job_id) or {}
            try:
                step, token = self._check_token(rep, job)
            except (AzuError, ValueError, KeyError) as exc:
                log.warning("token report from %s refused: %s", rep.worker_id,
                            exc.message if isinstance(exc, AzuError) else repr(exc))
                self.tally.add(metrics.CORE_REPORTS, kind="token", outcome="refused")
                continue
            if step is None:
                self.tally.add(metrics.CORE_REPORTS, kind="token", outcome="duplicate")
                continue  # a step already published (a replay): nothing to do
            self.tally.add(metrics.CORE_REPORTS, kind="token", outcome="accepted")
            self.recent[rep.worker_id] = time.monotonic()
            if step == 0 and job.get("created"):
                metrics.CORE_TTFT.observe(pipe, max(0.0, float(now) - float(job["created"])))
            sampling = Sampling.from_dict(json.loads(job["gen"]))
            reason: str | None = None
            if token in sampling.stop_ids or (sampling.stop and self._hits_stop(job_id, job, token, step)):
                reason = "stop"
            elif step + 1 >= sampling.max_tokens:
                reason = "length"
            elif job.get("cancel"):
                reason = "cancelled"
            job["step"] = str(step + 1)
            if token not in sampling.stop_ids:  # a stop id ends the job without being shown
                self.tally.add(metrics.CORE_TOKENS)
            if reason:
                job["status"] = "done"
                usage = jobs.usage_of(job)
                shown = "" if token in sampling.stop_ids else str(token)
                pipe.xadd(keys.events(job_id), {"k": "done", "t": shown, "reason": reason,
                                                "usage": json.dumps(usage)}, id=f"0-{step + 1}")
                jobs.close(pipe, job_id, status="done", reason=reason, usage=usage,
                           fields={"step": job["step"], "last_token": str(token)})
                ended.append((job_id, job))
                self.tally.add(metrics.CORE_JOBS_ENDED, reason=reason)
                self.decoders.pop(job_id, None)
            else:
                pipe.xadd(keys.events(job_id), {"k": "token", "t": str(token)}, id=f"0-{step + 1}")
                pipe.hset(keys.job(job_id), mapping={"step": job["step"], "updated": now})
        # The batch's counts so far ride on this round trip: a batch of tokens makes one write, not two.
        self.tally.write(pipe)
        pipe.execute(raise_on_error=False)
        for job_id, job in ended:
            selection.pick(self.r, job_id, [h.worker_id for h in jobs.job_route(job)],
                           queue=self.verify_queue)
            send_settle(job_id, dispatch=self.dispatch)
            jobs.end_caches(self.r, job_id, jobs.job_route(job), epoch=int(job.get("epoch") or 0),
                            dispatch=self.dispatch)

    def _check_token(self, rep: Report, job: dict[str, str]) -> tuple[int | None, int]:
        """(step, token) of a token report the sender may make; step None if already published."""
        body = rep.body
        job_id = _text(body.get("job_id"))
        step, token, epoch = body.get("step"), body.get("token"), body.get("epoch")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, token, epoch)):
            raise InvalidRequest(f"job {job_id}: malformed token report")
        assert isinstance(step, int) and isinstance(token, int)
        if not job or job.get("status") != "running":
            raise Forbidden(f"job {job_id} is not running")
        route = jobs.job_route(job)
        if rep.worker_id != route[-1].worker_id:
            raise Forbidden(f"job {job_id}: {rep.worker_id} is not the job's last hop")
        if epoch != int(job.get("epoch") or 0):
            raise Forbidden(f"job {job_id}: epoch {epoch} is not the job's")
        done = int(job.get("step") or 0)
        if step < done:
            return None, token
        if step > done:
            raise Forbidden(f"job {job_id}: step {step} skips ahead of step {done}")
        return step, token

    def _hits_stop(self, job_id: str, job: dict[str, str], token: int, step: int) -> bool:
        state = self.decoders.get(job_id)
        if state is None or state.steps != step:
            # (Re)built from what was published: the collector may have restarted since.
            from azu.tokenization import load_tokenizer

            model_id = job["model_id"]
            tok = self.tokenizers.get(model_id)
            if tok is None:
                from azu.registry.status import shard_dir

                tok = self.tokenizers[model_id] = load_tokenizer(shard_dir(model_id))
            stop = json.loads(job["gen"]).get("stop") or []
            state = _Decoder(tok.stream_decoder(stop=stop), 0)
            entries: Any = self.r.xrange(keys.events(job_id))
            published = [int(keys.as_str(f[b"t"])) for _id, f in entries if f.get(b"t")]
            for t in published[:step]:
                state.decoder.push(t)
            state.steps = step
            self.decoders[job_id] = state
        state.decoder.push(token)
        state.steps += 1
        return bool(state.decoder.stopped)

    # --- the rest ------------------------------------------------------------------------------------
    def _heartbeat(self, rep: Report) -> None:
        """Check a heartbeat now (a bad one is refused alone) and keep the record it makes for the batch's
        write, in place of any earlier one of the worker's in the batch (a worker that floods heartbeats costs
        the write of one)."""
        self.beats[rep.worker_id] = self._record(rep)

    def _write_heartbeats(self) -> None:
        """The directory records of the batch's heartbeats, written together (azu.network.directory
        .register_many): three round trips for them all, not three each, so a crowd of workers heartbeating
        costs the thread that publishes the tokens little. Each keeps only the spans the core ordered it."""
        infos, self.beats = list(self.beats.values()), {}
        look = self.r.pipeline(transaction=False)
        for info in infos:
            look.smembers(keys.assigned(info.worker_id))
        for info, ordered in zip(infos, look.execute(), strict=True):
            allowed = {keys.as_str(s) for s in ordered}
            kept = []
            for m, span in info.stages:
                if jobs.span_key(m, span) in allowed:
                    kept.append((m, span))
                else:
                    log.warning("worker %s claims %s %s, never ordered: ignored", info.worker_id, m, span)
            info.stages = kept
        try:
            directory.register_many(self.r, infos)
        except redis.ConnectionError:
            raise
        except Exception:  # the records are the core's own (checked fields): not one worker's doing
            log.exception("writing %d heartbeat(s) failed", len(infos))

    def _record(self, rep: Report) -> directory.WorkerInfo:
        """The directory record a heartbeat makes, before its spans are checked against the ones the core
        ordered (``_write_heartbeats``): the worker's own words checked and cut short."""
        b = rep.body
        claimed = b.get("stages") or []
        if not isinstance(claimed, list) or len(claimed) > MAX_STAGES:
            raise InvalidRequest(f"held stages: a list of at most {MAX_STAGES}")
        stages: list[tuple[str, Span]] = []
        for s in claimed:
            if not isinstance(s, list) or not s or not isinstance(s[0], str) or len(s[0]) > MAX_FIELD:
                raise InvalidRequest(f"malformed held stage {shown(s)}")
            stages.append((s[0], Span.from_list(list(s[1:]))))
        # What the record keeps of the worker's own words, cut short: every job's submit reads its holders'
        # records, and the P2P address travels in the grant of every job routed through the worker.
        return directory.WorkerInfo(
            worker_id=rep.worker_id, queue=worker_queue(rep.worker_id),
            device=_text(b.get("device"))[:MAX_FIELD] or "?",
            total_memory=_count(b.get("total_memory")), free_memory=_count(b.get("free_memory")),
            p2p_url=_short(_opt(b.get("p2p_url")), "p2p_url"), wallet=_short(_opt(b.get("wallet")), "wallet"),
            stages=sorted(set(stages)),
            cached_jobs=_count(b.get("cached_jobs")), started_at=float(_count(b.get("started_at"))))

    def _loaded(self, rep: Report) -> None:
        model_id = _text(rep.body.get("model_id"))
        jobs.start_waiting_jobs(self.r, model_id, dispatch=self.dispatch)

    def _load_failed(self, rep: Report) -> None:
        model_id, reason = _text(rep.body.get("model_id")), _text(rep.body.get("reason"))[:2000]
        span = Span.from_list(list(rep.body.get("span") or []))
        if not self.r.srem(keys.assigned(rep.worker_id), jobs.span_key(model_id, span)):
            raise Forbidden(f"{rep.worker_id} was not ordered to load {model_id} {span}")
        self.r.hset(keys.worker_errors(rep.worker_id), model_id, reason)
        jobs.fail_waiting_jobs(self.r, model_id, f"worker {rep.worker_id} could not load layers "
                               f"[{span.first}, {span.last}) of {model_id}: {reason}", dispatch=self.dispatch)

    def _job_failed(self, rep: Report) -> None:
        job_id = _text(rep.body.get("job_id"))
        job = jobs.job_fields(self.r.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
        if rep.worker_id not in {h.worker_id for h in jobs.job_route(job)}:
            raise Forbidden(f"job {job_id}: {rep.worker_id} is not on the job's route")
        jobs.fail_job(self.r, job_id, _text(rep.body.get("reason"))[:2000], dispatch=self.dispatch)

    def _route_hop(self, rep: Report) -> tuple[str, int, int]:
        """(job id, epoch, hop) of a commit/evidence report the sender may make: it is that hop of the job's
        current route."""
        b = rep.body
        job_id, epoch, hop = _text(b.get("job_id")), b.get("epoch"), b.get("hop", -1)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not isinstance(hop, int):
            raise InvalidRequest(f"job {job_id}: malformed {rep.kind} report")
        job = jobs.job_fields(self.r.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
        if epoch != int(job.get("epoch") or 0):
            raise Forbidden(f"job {job_id}: epoch {epoch} is not the job's")
        route = jobs.job_route(job)
        if hop == -1:  # evidence names no hop: the sender's place on the route
            hop = next((i for i, h in enumerate(route) if h.worker_id == rep.worker_id), -1)
        if not 0 <= hop < len(route) or route[hop].worker_id != rep.worker_id:
            raise Forbidden(f"job {job_id}: {rep.worker_id} is not hop {hop} of the job's route")
        return job_id, epoch, hop

    def _commit(self, rep: Report) -> None:
        job_id, epoch, hop = self._route_hop(rep)
        first, final, data = rep.body.get("first"), rep.body.get("final"), rep.body.get("data")
        if (not isinstance(first, int) or first < 0 or not isinstance(final, bool)
                or not isinstance(data, bytes)):
            raise InvalidRequest(f"job {job_id}: malformed commit report")
        rows, k = shape_of(data)
        # Bounded: one chunk per report, on a chunk boundary, within the job's positions.
        limit = self._positions(job_id)
        if (rows > CHUNK or k != TOP_K or first % CHUNK
                or first + rows > limit or (rows == 0 and not final)):
            raise InvalidRequest(f"job {job_id}: commitment of rows [{first}, {first + rows}) is not a chunk "
                                 f"of the job's {limit} positions")
        key = keys.commits(job_id)
        pipe = self.r.pipeline(transaction=False)
        # The first commitment of a chunk stays: a worker cannot change what it committed to.
        pipe.hsetnx(key, f"{epoch}:{hop}:{first}", rep.pack())
        if final:
            pipe.hsetnx(key, f"{epoch}:{hop}:final", str(first + rows))
        pipe.expire(key, keys.JOB_TTL_S)
        pipe.execute()

    def _positions(self, job_id: str) -> int:
        gen = json.loads(keys.as_str(self.r.hget(keys.job(job_id), "gen") or b"{}"))
        return int(gen.get("prompt_len", 0)) + int(gen.get("max_tokens", 0))

    def _evidence(self, rep: Report) -> None:
        job_id, _epoch, _hop = self._route_hop(rep)
        if not self.r.exists(keys.evidence_asked(job_id, rep.worker_id)):
            raise Forbidden(f"job {job_id}: nobody asked {rep.worker_id} for evidence")
        bundles = rep.body.get("bundles")
        if not isinstance(bundles, list) or not all(isinstance(b, bytes) for b in bundles):
            raise InvalidRequest(f"job {job_id}: malformed evidence report")
        self.r.set(keys.evidence(job_id, rep.worker_id), rep.pack(), nx=True, ex=keys.JOB_TTL_S)

    def _refused(self, rep: Report) -> None:
        self.r.incr(keys.refused(rep.worker_id))

    def _pong(self, rep: Report) -> None:
        key = _text(rep.body.get("key"))
        if not key.startswith(keys.PING_PREFIX):
            raise Forbidden(f"pong key {shown(key)} is not a health-check key")
        self.r.set(key, _text(rep.body.get("value")), ex=3600)

    _HANDLERS: dict[str, Callable[[Collector, Report], None]] = {
        "heartbeat": _heartbeat, "loaded": _loaded, "load_failed": _load_failed, "job_failed": _job_failed,
        "refused": _refused, "pong": _pong, "commit": _commit, "evidence": _evidence}


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("malformed report: a required text field is missing")
    return value


def _opt(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(value: str | None, what: str) -> str | None:
    """A value the worker names for itself (an address, a wallet), refused past ``MAX_FIELD`` characters."""
    if value is not None and len(value) > MAX_FIELD:
        raise InvalidRequest(f"heartbeat {what} of more than {MAX_FIELD} characters")
    return value


def _count(value: Any) -> int:
    """A count a worker reports (bytes, jobs, seconds); 0 for anything else (not a number, negative, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def process_reports(r: redis.Redis, reports: Sequence[bytes], *, dispatch: Dispatcher | None = None,
                    collector: Collector | None = None) -> int:
    """Handle packed reports (what the loop pops), for tests and one-off use. Returns how many were taken."""
    return (collector or Collector(r, dispatch=dispatch)).process(reports)


def run(settings: Settings | None = None, *, stop_event: threading.Event | None = None,
        r: redis.Redis | None = None, dispatch: Dispatcher | None = None, base: str = keys.REPORTS,
        wait_s: float = 1.0) -> None:
    """The loop, until ``stop_event`` is set: hold the lease, take reports (waiting ``wait_s`` at most)."""
    settings = settings or get_settings()
    r = r or redis.Redis.from_url(settings.redis_url)
    stop_event = stop_event or threading.Event()
    collector = Collector(r, dispatch=dispatch)
    lists = reports.ReportLists(r, base)  # base: tests keep their lists (and lease) apart
    sweep_at = 0  # SSCAN's cursor over the enrolled workers
    sweep = reports.SWEEP_MIN  # how many a round looks at (more as more are enrolled: ``reports.sweep_size``)
    lease = keys.COLLECTOR_LOCK if base == keys.REPORTS else f"{keys.COLLECTOR_LOCK}:{base}"
    me = uuid.uuid4().hex
    check_every = min(1.0, watchdog.step_timeout_s(settings) / 2)
    checked = time.monotonic()
    held_until = 0.0  # when this loop must next make sure it holds the lease
    while not stop_event.is_set():
        try:
            # The lease is taken or renewed once a second, not before every take: tokens that arrive one
            # after another (one job decoding) would each wait for that round trip. It lasts LEASE_S, far
            # longer than a second, so no other collector can take it meanwhile. The next slice of the
            # enrolled workers is read with it, and the round after looks at their lists (for a hint lost).
            swept: list[str] = []
            if time.monotonic() >= held_until:
                pipe = r.pipeline(transaction=False)
                pipe.eval(_HOLD, 1, lease, me, LEASE_S)
                pipe.scard(keys.REPORTERS)
                pipe.sscan(keys.REPORTERS, sweep_at, count=sweep)
                held, total, (sweep_at, enrolled) = pipe.execute()
                sweep = reports.sweep_size(total)
                if not held:
                    stop_event.wait(1.0)  # another collector holds the lease
                    continue
                held_until = time.monotonic() + LEASE_RENEW_S
                swept = [keys.as_str(w) for w in enrolled]
            got, senders = lists.take(None if swept else wait_s, first=collector.recent_senders(), also=swept)
            if got:
                collector.process(got, senders=senders)
            if base == keys.REPORTS and time.monotonic() - checked >= check_every:
                # Between batches, in this thread: the jobs that lost a worker carry on elsewhere.
                checked = time.monotonic()
                watchdog.recover_lost(r, dispatch=collector.dispatch)
        except redis.ConnectionError:
            log.warning("collector: Redis unavailable; retrying")
            stop_event.wait(1.0)
        except Exception:
            log.exception("collector: a batch failed")
    if r.get(lease) == me.encode():
        r.delete(lease)


def start_thread(settings: Settings | None = None, **kwargs: Any) -> tuple[threading.Thread, threading.Event]:
    """The loop in a daemon thread (the scheduler hosts one). Returns (thread, stop event)."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(settings,), kwargs={"stop_event": stop, **kwargs},
                              name="azu-collector", daemon=True)
    thread.start()
    return thread, stop
