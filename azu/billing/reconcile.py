"""No hold left behind: the reconciler closes every hold whose job can no longer close it itself.

A hold (``Hold``, status ``held``) is placed in PostgreSQL when a job is accepted and closed by
``azu.network.jobs.bill_ended_job`` when the ``core`` task ``workers.scheduler.settle`` runs after the job's
end. That task can be lost (a crashed scheduler, a lost broker message, Redis restarted before it ran), and
the job's record in Redis (``azu:job:<id>``) can vanish (a Redis restart without persistence, a flush, the
day-long TTL). Every ``AZU_RECONCILE_INTERVAL_S`` (default 30 s) the beat task
``workers.scheduler.reconcile`` runs :func:`reconcile` over every open hold, oldest first:

1. **Ended, never billed** (the job hash holds a core-signed end record): billed by ``bill_ended_job``
   itself, so exactly as the settle task would; a later settle, or a concurrent one, changes nothing (the
   hold's row lock and the ledger's idempotency key ``job:<id>:settle``). If Redis says "settled" while the
   ledger still holds the hold (a scheduler that ran without the ledger, a restored database), the ledger
   wins: the mark is dropped and the job billed from its end record.
2. **Running past its deadline** (hash present, no end record): the deadline is the expiry of the job's
   core-signed grant (after it no worker accepts a step of the job, so it cannot make progress) or, for a job
   never started, its creation plus the load deadline, the request timeout and the grant's slack; plus
   ``AZU_RECONCILE_GRACE_S`` (default 60 s) either way. The job is ended the way the watchdog ends it
   (``jobs.fail_job``: the client gets an error event, the hops an end order) and then billed: its end record
   carries what the core itself recorded, the route in the grant times the steps the collector published.
3. **Forgotten** (no hash at all) and the hold older than the grace: the job gets a tombstone hash, claimed
   with ``HSETNX status`` as submit claims a job id (so no late submit can still create the job under a
   released hold), holding a core-signed end record of zero usage; ``bill_ended_job`` then releases the hold
   whole, and a run that dies in between finds the record next time. Younger holds are left: the API places
   the hold just before it writes the hash.
4. Anything else (running within its deadline) is left alone.

What is credited, and why. The user pays only for work the core can prove from its own records: the route it
signed and the tokens it published. Those live in the job's hash (``route``/``grant``, ``step``) and in the
end record signed from them; a worker's own claim is never evidence. So a job whose hash survives is billed
for its published steps, honest workers paid for them; a job whose hash is gone is released whole, because
nothing left proves any step (the events stream holds the tokens but not the route, so it cannot say who ran
what, and it expires with the hash anyway). The cost of a lost record falls on the workers of those jobs,
never on the user, and the Redis persistence below keeps such losses to about a second of writes.

What Redis must persist. The core's Redis runs with AOF (``appendonly yes``, ``appendfsync everysec``): the
facts the bill is made from are written by the collector at token rate, and putting each of them in
PostgreSQL would put the ledger on the decode loop; AOF keeps them across a restart for one fsync a second,
and the queued settle messages with them. A restart then loses at most the last second of writes: a job
whose end record was in it is released (the user is not charged, those workers are not paid), a running job
loses at most its last published step from the bill. The ledger stays the record of money only: nothing
here needs a new table.

How long a hold can stay open, with ``I`` the interval and ``G`` the grace (PostgreSQL and Redis reachable;
while either is down nothing moves, and the clock resumes when both are back):
- ended with an end record: ``I`` after the end (the settle task normally does it at once);
- forgotten: ``max(G, time Redis forgot it) + I`` after the hold was placed;
- stuck: the grant's expiry (``start + AZU_REQUEST_TIMEOUT_S + GRANT_SLACK_S``) ``+ G + I``, at most
  ``AZU_LOAD_DEADLINE_S + AZU_REQUEST_TIMEOUT_S + GRANT_SLACK_S + G + I`` after submit (1590 s by default).

Concurrency: one run at a time (a PostgreSQL advisory lock on its own connection; a run that finds it taken
does nothing); each hold moves in its own ledger transaction through the ``Billing`` seam, whose settle and
release lock the hold's row and post under unique idempotency keys, so a run racing the settle task, or a
second run, moves no money twice. A Redis or PostgreSQL outage aborts the run (an unreachable Redis must
never look like a forgotten job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine, extract, func, select

from azu.billing.base import Billing
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import Hold, HoldStatus
from azu.config import get_settings
from azu.errors import AzuError
from azu.network import auth, jobs, keys
from azu.network.dispatch import Dispatcher
from azu.network.wire import JobGrant
from azu.payments.payouts import advisory_lock

log = logging.getLogger(__name__)

# pg advisory lock key of reconcile runs (an arbitrary constant: "azu_reco" in ASCII; the payouts' differs).
RECONCILE_LOCK_KEY = 0x617A755F7265636F
FORGOTTEN = "forgotten by Redis: the core kept no record of this job; its hold was given back"
_CHUNK = 500  # job hashes read per Redis round trip


@dataclass
class ReconcileReport:
    """What one run did, for logs and tests (job ids per outcome)."""

    skipped: bool = False  # another run held the lock: this one did nothing
    open_holds: int = 0  # holds still open when the run started
    settled: list[str] = field(default_factory=list)  # ended jobs billed (charged their usage)
    released: list[str] = field(default_factory=list)  # holds given back whole (nothing proven)
    ended: list[str] = field(default_factory=list)  # jobs past their deadline the run ended (then billed)
    left: int = 0  # holds left open (jobs within their deadline, or too young to judge)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_holds(engine: Engine) -> list[tuple[str, float]]:
    """(job id, age in seconds by the database's clock) of every held hold, oldest first."""
    age = extract("epoch", func.now() - Hold.created_at)
    with session_scope(engine) as s:
        rows = s.execute(select(Hold.id, age).where(Hold.status == HoldStatus.HELD.value)
                         .order_by(Hold.created_at, Hold.id)).all()
    return [(job_id, float(seconds)) for job_id, seconds in rows]


def _hold_status(engine: Engine, job_id: str) -> str | None:
    with session_scope(engine) as s:
        return s.execute(select(Hold.status).where(Hold.id == job_id)).scalar_one_or_none()


def deadline(raw: dict[Any, Any], *, load_deadline_s: float, request_timeout_s: float,
             grace_s: float) -> float | None:
    """When (unix seconds) a job with this hash, and no end record, is past saving; None if unknown.

    The core-signed grant's expiry when there is a valid one, else its creation plus every wait a job may
    still have before its grant (loads, the request timeout, the grant's slack)."""
    fields = {keys.as_str(k): v for k, v in raw.items()}
    grant, sig = fields.get("grant"), fields.get("grant_sig")
    if isinstance(grant, bytes) and isinstance(sig, bytes):
        try:
            auth.check(auth.public_hex(auth.core_signing_key()), auth.GRANT, grant, sig, what="job grant")
            return JobGrant.unpack(grant).expires_at + grace_s
        except AzuError:
            pass  # not the core's grant: fall back to the creation time
    try:
        created = float(keys.as_str(fields.get("created") or b""))
    except ValueError:
        return None
    return created + load_deadline_s + request_timeout_s + jobs.GRANT_SLACK_S + grace_s


def reconcile(r: redis.Redis, engine: Engine, billing: Billing, *, now: float | None = None,
              grace_s: float | None = None, dispatch: Dispatcher | None = None) -> ReconcileReport:
    """Settle or release every open hold whose job ended, was forgotten by Redis, or is past its deadline.

    ``engine`` is the ledger's (to list holds and take the run's lock); money moves through ``billing`` only.
    ``now`` and ``grace_s`` default to the clock and ``AZU_RECONCILE_GRACE_S``."""
    settings = get_settings()
    grace_s = settings.reconcile_grace_s if grace_s is None else grace_s
    report = ReconcileReport()
    with advisory_lock(engine, RECONCILE_LOCK_KEY) as got:
        if not got:
            report.skipped = True
            log.info("reconcile run skipped: another run holds the lock")
            return report
        holds = open_holds(engine)
        report.open_holds = len(holds)
        at = time.time() if now is None else now
        for start in range(0, len(holds), _CHUNK):
            chunk = holds[start:start + _CHUNK]
            pipe = r.pipeline(transaction=False)
            for job_id, _age in chunk:
                pipe.hgetall(keys.job(job_id))
            hashes: list[dict[Any, Any]] = pipe.execute()
            for (job_id, age), raw in zip(chunk, hashes, strict=True):
                try:
                    _one(r, engine, billing, job_id, age, raw, report, now=at, grace_s=grace_s,
                         dispatch=dispatch)
                except (redis.ConnectionError, redis.TimeoutError):
                    raise  # Redis went away mid-run: stop, never read its silence as "forgotten"
                except Exception as exc:
                    log.exception("reconcile: job %s failed", job_id)
                    report.errors.append(f"{job_id}: {exc!r}")
    if report.settled or report.released or report.ended or report.errors:
        log.info("reconcile: %d open, settled %d, released %d, ended %d, left %d, errors %d",
                 report.open_holds, len(report.settled), len(report.released), len(report.ended), report.left,
                 len(report.errors))
    return report


def _one(r: redis.Redis, engine: Engine, billing: Billing, job_id: str, age: float, raw: dict[Any, Any],
         report: ReconcileReport, *, now: float, grace_s: float, dispatch: Dispatcher | None) -> None:
    settings = get_settings()
    if not raw:
        if age < grace_s:
            report.left += 1  # placed moments ago: the API may not have written the job yet
            return
        if not _forget(r, job_id):
            report.left += 1  # the job exists after all (a late submit won the race): judge it next run
            return
    outcome = jobs.bill_ended_job(r, job_id, billing=billing)
    if outcome == "already settled" and _hold_status(engine, job_id) == HoldStatus.HELD.value:
        # Redis says billed, the ledger says not: the ledger is the record of money. Bill again (idempotent).
        log.error("job %s: marked settled in Redis but its hold is open in the ledger; billing it", job_id)
        r.hdel(keys.job(job_id), "settled", "settled_at")
        outcome = jobs.bill_ended_job(r, job_id, billing=billing)
    if outcome == "not finished":
        due = deadline(raw, load_deadline_s=settings.load_deadline_s,
                       request_timeout_s=settings.request_timeout_s, grace_s=grace_s)
        if due is None:  # no readable times in the hash: judge by the hold's own age
            due = (now - age + settings.load_deadline_s + settings.request_timeout_s + jobs.GRANT_SLACK_S
                   + grace_s)
        if now < due:
            report.left += 1
            return
        if _end(r, job_id, dispatch=dispatch):
            report.ended.append(job_id)
        outcome = jobs.bill_ended_job(r, job_id, billing=billing)
    if outcome == "settled":
        report.settled.append(job_id)
    elif outcome == "released":
        report.released.append(job_id)
    elif outcome != "already settled":  # "unknown": the hash vanished since it was read; next run
        report.left += 1


def _forget(r: redis.Redis, job_id: str) -> bool:
    """Close a job Redis has no record of with a zero-usage end record; False if a hash appeared meanwhile.

    The ``HSETNX`` decides: once it is written no submit can create the job any more (submit claims the id
    with the same ``HSETNX``), so the hold can be released without a job starting under it afterwards."""
    if not r.hsetnx(keys.job(job_id), "status", "failed"):
        return False
    pipe = r.pipeline()
    jobs.close(pipe, job_id, status="failed", reason="error", fields={"error": FORGOTTEN},
               usage=jobs.route_usage((), prompt_tokens=0, completion_tokens=0))
    pipe.execute()
    log.warning("job %s: %s", job_id, FORGOTTEN)
    return True


def _end(r: redis.Redis, job_id: str, *, dispatch: Dispatcher | None) -> bool:
    """End a job past its deadline with a core-signed end record of what the core published. False if it
    needed no ending (ended meanwhile, or gone)."""
    reason = "ended by the reconciler: past its deadline without an end"
    if jobs.fail_job(r, job_id, reason, dispatch=dispatch):
        return True
    raw: dict[Any, Any] = r.hgetall(keys.job(job_id))  # type: ignore[assignment]
    job = jobs.job_fields(raw)
    record: dict[str, Any] = {**job, "end_sig": raw.get(b"end_sig")}
    if not job or jobs.signed_end(record) is not None:
        return False
    # fail_job refused: a failure claimed but never written (a crash in between), or an ending without a
    # valid record. Write the record from what the core published, as fail_job would have.
    pipe = r.pipeline()
    jobs.close(pipe, job_id, status="failed", reason="error", usage=jobs.usage_of(job),
               fields={"error": reason})
    pipe.execute()
    return True
