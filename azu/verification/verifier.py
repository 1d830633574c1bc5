"""The verifier: a core process that re-computes picked jobs after they end and judges each stage.

One check (``Verifier.check``), for a job that ended on its route (the last epoch's route: a re-routed job is
checked on the route that produced its whole sequence, from position 0):

1. Wait (``AZU_VERIFY_WAIT_S``) for every hop's commitments up to its ``final`` one
   (azu.verification.commitment; the collector kept them as signed reports, the first per chunk).
2. Re-compute the job's whole sequence -- the prompt and every published token but the last -- through the
   route's spans in one prefill per span, with the registry's own shard files (hash-checked at load).
3. Compare each hop's commitment with the re-computed rows (the last hop: its logits rows, and every token it
   published must be what the sampler draws from the re-computed logits, within the tolerance).
4. All match: ``verified``. Otherwise the first hop ``k`` that disagrees is either wrong itself, or was handed
   wrong numbers by the hop before it while that hop committed to the right ones. Commitments alone cannot
   tell the two apart, so the verifier asks hop ``k`` for the bundles it received (signed by hop ``k-1``; a
   worker cannot forge them), re-computes hop ``k`` from that input, and:
   - hop ``k``'s commitment disagrees with its own input's result: hop ``k`` is at fault;
   - it agrees: hop ``k`` computed right from what it got; walk back: hop ``j = k-1`` is at fault if what it
     sent (signed) is not what its layers give for what *it* received (hop 0: the token ids, which the core
     knows); else go on to ``j-1``.
   A verdict names a worker only with its own signatures as proof; with evidence missing it is
   ``inconclusive``: nobody is penalized, the workers involved become suspect (all their jobs checked).
5. A failed check: the worker's earnings for the job are withheld and the user refunded
   (``Billing.withhold``), it becomes suspect, and after ``AZU_VERIFY_BAN_AFTER`` failures it is taken off
   routes (``azu:banned``) and its payouts frozen (``Billing.freeze_worker``). The evidence stays in the
   verdict.

The verifier runs the layers itself ("a verifier role on spare capacity"): it trusts no worker's numbers, so
no two workers can vouch for each other. One verifier acts at a time (a lease on ``azu:verify:lock``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from azu.config import Settings, get_settings
from azu.engine.span import Span
from azu.errors import AzuError
from azu.network import auth, directory, keys
from azu.network.dispatch import Dispatcher
from azu.network.jobs import job_fields, job_route
from azu.network.wire import Hop, JobGrant, Report, Sampling, StepBundle, StepPayload, unpack_tensor
from azu.verification import orders, status
from azu.verification.commitment import Mismatch, RowCommitment, check_rows, rows_close

if TYPE_CHECKING:
    import torch

    from azu.billing.base import Billing
    from azu.engine.stage import Stage

log = logging.getLogger(__name__)

LEASE_S = 60
COMMIT_GRACE_S = 300.0  # after the job's end: how long a live worker's missing commitments are waited for


@dataclass
class Verdict:
    status: str  # verified | failed | inconclusive (| pending: not yet, the job goes back on the queue)
    hop: int | None = None
    worker: str | None = None
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    compute_s: float = 0.0  # the verifier's time re-computing for this check

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"checked_at": time.time(), "compute_s": round(self.compute_s, 6)}
        if self.hop is not None:
            out.update(hop=self.hop, worker=self.worker)
        if self.reason:
            out["reason"] = self.reason
        if self.evidence:
            out["evidence"] = self.evidence
        return out


@dataclass
class _Job:
    """What a check needs of a job, read from the core's own records."""

    job_id: str
    model_id: str
    route: tuple[Hop, ...]
    grant: JobGrant
    grant_bytes: bytes
    epoch: int
    prompt: list[int]
    tokens: list[int]  # every published token, the last included
    sampling: Sampling

    @property
    def inputs(self) -> list[int]:
        """The ids every position of the sequence was computed from (the last token is never fed back)."""
        return self.prompt + self.tokens[:-1]

    @property
    def head_rows(self) -> range:
        """Positions whose logits this epoch's last hop produced (one per step from the epoch's first)."""
        return range(len(self.prompt) - 1 + self.grant.start, len(self.prompt) - 1 + len(self.tokens))


class EvidenceMissing(Exception):
    pass


class Verifier:
    def __init__(self, r: redis.Redis, *, settings: Settings | None = None,
                 dispatch: Dispatcher | None = None, billing: Billing | None = None,
                 max_stages: int = 8, pump: Callable[[], object] | None = None) -> None:
        self.r = r
        self.pump = pump  # tests: runs an in-process network while the verifier waits for its reports
        self.settings = settings or get_settings()
        self.dispatch = dispatch
        self._billing = billing
        self.stages: OrderedDict[tuple[str, Span], Stage] = OrderedDict()
        self.max_stages = max_stages
        self.compute_s = 0.0  # time spent re-computing (the verifier's cost)
        self.errors: list[float] = []  # the relative differences of the commitments checked in this check

    @property
    def billing(self) -> Billing:
        if self._billing is None:
            from azu.billing.factory import get_billing

            self._billing = get_billing()
        return self._billing

    @property
    def rtol(self) -> float:
        return self.settings.verify.rtol

    # --- reading the job -------------------------------------------------------------------------
    def _job(self, job_id: str) -> _Job | None:
        raw: dict[Any, Any] = self.r.hgetall(keys.job(job_id))  # type: ignore[assignment]
        job = job_fields(raw)
        grant_bytes = raw.get(b"grant") or raw.get("grant")
        if not job or job.get("status") != "done" or not grant_bytes:
            return None
        grant = JobGrant.unpack(bytes(grant_bytes))
        steps = int(job.get("step") or 0)
        entries: Any = self.r.xrange(keys.events(job_id))
        tokens = [int(keys.as_str(f[b"t"])) for _id, f in entries if f.get(b"t")]
        if len(tokens) == steps - 1 and job.get("last_token"):
            tokens.append(int(job["last_token"]))  # a stop id ends the job without being shown
        if steps == 0 or len(tokens) != steps:
            return None
        return _Job(job_id=job_id, model_id=job["model_id"], route=job_route(job), grant=grant,
                    grant_bytes=bytes(grant_bytes), epoch=int(job.get("epoch") or 0),
                    prompt=json.loads(job["prompt_ids"]), tokens=tokens,
                    sampling=Sampling.from_dict(json.loads(job["gen"])))

    def _commitments(self, job: _Job, deadline: float) -> dict[int, RowCommitment] | None:
        """Each hop's whole commitment, waiting for the final chunks until ``deadline``; None if a hop's
        never came complete."""
        while True:
            raw: dict[Any, Any] = self.r.hgetall(keys.commits(job.job_id))  # type: ignore[assignment]
            fields = {keys.as_str(k): v for k, v in raw.items()}
            out: dict[int, RowCommitment] = {}
            for hop in range(len(job.route)):
                final = fields.get(f"{job.epoch}:{hop}:final")
                if final is None:
                    break
                parts: list[RowCommitment] = []
                row = 0
                total = int(keys.as_str(final))
                while row < total or (row == 0 and not parts):
                    blob = fields.get(f"{job.epoch}:{hop}:{row}")
                    if blob is None:
                        break
                    c = RowCommitment.unpack(Report.unpack(bytes(blob)).body["data"])
                    parts.append(c)
                    row += c.rows
                    if c.rows == 0:
                        break
                if row != total:
                    break
                out[hop] = RowCommitment.concat(parts)
            if len(out) == len(job.route):
                return out
            if time.monotonic() > deadline:
                return None
            self._wait()

    def _wait(self) -> None:
        if self.pump is not None:
            self.pump()
        time.sleep(0.05 if self.pump is not None else 0.2)

    # --- computing -------------------------------------------------------------------------------
    def stage(self, model_id: str, span: Span) -> Stage:
        key = (model_id, span)
        got = self.stages.get(key)
        if got is None:
            from azu.engine.stage import Stage
            from azu.registry.status import shard_dir

            got = Stage.load(shard_dir(model_id), span, device="cpu", dtype="float32",
                             max_cached_tokens=1 << 30)
            self.stages[key] = got
            while len(self.stages) > self.max_stages:
                self.stages.popitem(last=False)
        self.stages.move_to_end(key)
        return got

    def run_hop(self, job: _Job, hop: int, x: torch.Tensor) -> torch.Tensor:
        """Hop ``hop``'s layers on ``x`` (the ids, or the hidden rows it was given), in one prefill: hidden
        rows, or on the last hop the logits of every position."""
        h = job.route[hop]
        stage = self.stage(job.model_id, h.span)
        run_id = f"verify-{uuid.uuid4().hex}"
        started = time.perf_counter()
        try:
            return stage.forward(run_id, x, all_logits=h.span.head)
        finally:
            stage.end_job(run_id, release=False)  # the next check reuses the memory: no trim per check
            self.compute_s += time.perf_counter() - started

    def _judge(self, job: _Job, hop: int, commitment: RowCommitment, out: torch.Tensor) -> Mismatch | None:
        """Does ``commitment`` (and, on the last hop, the published tokens) agree with ``out``?"""
        if not job.route[hop].span.head:
            return check_rows(commitment, out, rtol=self.rtol, seen=self.errors)
        from azu.engine.sampling import SamplingParams, token_matches

        rows = out[job.head_rows.start:job.head_rows.stop]
        bad = check_rows(commitment, rows, rtol=self.rtol, seen=self.errors)
        if bad is not None:
            return bad
        g = job.sampling
        params = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        for i, step in enumerate(range(job.grant.start, len(job.tokens))):
            row = rows[i]
            tolerance = self.rtol * float(row.abs().max())
            if not token_matches(row, job.tokens[step], params, seed=g.seed, step=step, tolerance=tolerance):
                return Mismatch(i, f"token at step {step}", float("inf"))
        return None

    # --- evidence --------------------------------------------------------------------------------
    def evidence_input(self, job: _Job, hop: int, deadline: float) -> torch.Tensor:
        """The hidden rows hop ``hop`` received, from the bundles it kept (each signed by hop ``hop-1``)."""
        import torch

        worker = job.route[hop].worker_id
        key = keys.evidence(job.job_id, worker)
        if not self.r.exists(key):
            self.r.set(keys.evidence_asked(job.job_id, worker), "1", ex=keys.JOB_TTL_S)
            orders.send_evidence_order(worker, job_id=job.job_id, epoch=job.epoch, dispatch=self.dispatch)
        blob: Any = None
        while blob is None:
            blob = self.r.get(key)
            if blob is None:
                if time.monotonic() > deadline:
                    raise EvidenceMissing(f"{worker} sent no evidence")
                self._wait()
        sender = job.route[hop - 1].worker_id
        sender_key = job.grant.public_keys[hop - 1]
        # The rows the hop ran, rebuilt as the hop admits them (WorkerNode._admit and _run_group), in the
        # order they arrived: a payload runs only where the positions run so far end. One behind them is a
        # duplicate the hop dropped, one past them leaves a gap the hop dropped: neither is what it ran,
        # whatever the sender signed (a sender could otherwise send right numbers it knows will be dropped,
        # then wrong ones that run, and have the hop blamed for them).
        n = len(job.inputs)
        parts: list[torch.Tensor] = []
        at = 0
        for b in Report.unpack(bytes(blob)).body.get("bundles") or []:
            try:
                bundle = StepBundle.unpack(b)
                if bundle.sender != sender:
                    continue
                auth.check(sender_key, auth.STEPS, bundle.signed_part(), bundle.sig, what="kept bundle")
                for packed in bundle.steps:
                    p = StepPayload.unpack(packed)
                    x = p.x
                    if p.job_id != job.job_id or p.hop != hop or p.grant != job.grant_bytes \
                            or not isinstance(x, bytes) or not job.grant.start <= p.step < len(job.tokens):
                        continue
                    first = p.step == job.grant.start
                    if p.pos != at or (not first and p.pos != p.end - 1) or p.pos >= p.end:
                        continue
                    rows = unpack_tensor(x)
                    if not p.fits(rows):
                        continue
                    parts.append(rows)
                    at += int(rows.shape[0])
            except AzuError as exc:
                log.warning("job %s: evidence bundle from %s refused: %s", job.job_id, worker, exc.message)
        if at < n:
            raise EvidenceMissing(f"{worker}'s evidence lacks position {at} of the job")
        rows = torch.cat(parts)
        if rows.shape[0] != len(job.inputs):
            raise EvidenceMissing(f"{worker}'s evidence covers {rows.shape[0]} of {len(job.inputs)} "
                                  "positions")
        return rows

    def localize(self, job: _Job, first_bad: int, commitments: dict[int, RowCommitment],
                 mismatch: Mismatch, deadline: float) -> Verdict:
        import torch

        ids = torch.tensor(job.inputs, dtype=torch.long)
        detail = {"first_mismatch_hop": first_bad, "mismatch": mismatch.as_dict()}
        if first_bad == 0:
            return self._guilty(job, 0, "its committed output is not what its layers give for the job's "
                                "tokens", {**detail, "mismatch": mismatch.as_dict()})
        try:
            received = self.evidence_input(job, first_bad, deadline)
        except EvidenceMissing as exc:
            return Verdict("inconclusive", first_bad, job.route[first_bad].worker_id,
                           f"hop {first_bad} disagrees with the re-computation and {exc}", detail)
        own = self._judge(job, first_bad, commitments[first_bad], self.run_hop(job, first_bad, received))
        if own is not None:
            return self._guilty(job, first_bad, "its committed output is not what its layers give for the "
                                "input it received (signed by the hop before)",
                                {**detail, "own": own.as_dict()})
        sent = received  # what hop j below sent, signed by it
        for j in range(first_bad - 1, -1, -1):
            try:
                given = ids if j == 0 else self.evidence_input(job, j, deadline)
            except EvidenceMissing as exc:
                return Verdict("inconclusive", j, job.route[j].worker_id,
                               f"hop {first_bad} was handed numbers that differ from the re-computation, and "
                               f"{exc}", detail)
            bad = rows_close(sent, self.run_hop(job, j, given), rtol=self.rtol)
            if bad is not None:
                return self._guilty(job, j, f"it sent hop {j + 1} hidden states that are not its layers' "
                                    "output for the input it received, while committing to the right ones",
                                    {**detail, "sent": bad.as_dict()})
            sent = given
        return Verdict("inconclusive", first_bad, job.route[first_bad].worker_id,
                       "every hop computed right from what it was given, yet the whole disagrees "
                       "(tolerance?)",
                       detail)

    def _guilty(self, job: _Job, hop: int, reason: str, evidence: dict[str, Any]) -> Verdict:
        return Verdict("failed", hop, job.route[hop].worker_id, f"hop {hop} ({job.route[hop].worker_id}): "
                       f"{reason}", evidence)

    # --- one check -------------------------------------------------------------------------------
    def verify(self, job_id: str) -> Verdict:
        """Judge the job (no side effects but evidence orders)."""
        import torch

        self.errors = []
        job = self._job(job_id)
        if job is None:
            return Verdict("inconclusive", reason="the job's record is incomplete or expired")
        deadline = time.monotonic() + self.settings.verify.wait_s
        commitments = self._commitments(job, deadline)
        if commitments is None:
            missing = [i for i in range(len(job.route))
                       if not self.r.hexists(keys.commits(job_id), f"{job.epoch}:{i}:final")]
            hop = missing[0] if missing else 0
            worker = job.route[hop].worker_id
            # Committing is every worker's own duty: a worker still alive that did not commit to a job it was
            # paid for fails the check; one that died since (its commitments lost with it) does not.
            # Heartbeating, not lost, not banned (a banned worker's silence was judged already).
            if directory.is_live(self.r, worker) and not self.r.hexists(keys.BANNED, worker):
                # A worker sends its last chunk with its next hand-over after the job ended, or when its
                # session ends: give it a while (the job goes back on the queue) before its silence counts.
                finished = float(self.r.hget(keys.job(job_id), "finished") or 0)
                if time.time() - finished < COMMIT_GRACE_S:
                    return Verdict("pending", hop, worker, "waiting for a hop's last commitments")
                return self._guilty(job, hop, "it did not commit to its output (alive, "
                                    f"{COMMIT_GRACE_S:.0f} s after the job ended)",
                                    {"missing_commitment": True})
            return Verdict("inconclusive", hop, worker,
                           "a hop's commitments never came complete and its worker is gone")
        x: torch.Tensor = torch.tensor(job.inputs, dtype=torch.long)
        for hop in range(len(job.route)):
            out = self.run_hop(job, hop, x)
            bad = self._judge(job, hop, commitments[hop], out)
            if bad is not None:
                return self.localize(job, hop, commitments, bad, deadline)
            x = out
        # How close the honest numbers came to the tolerance (bench/verification.py reports the largest).
        return Verdict("verified", evidence={"max_error": max(self.errors, default=0.0)})

    def check(self, job_id: str) -> Verdict:
        """Judge the job and act on the verdict: status, counters, money, bans."""
        spent = self.compute_s
        verdict = self.verify(job_id)
        verdict.compute_s = self.compute_s - spent
        if verdict.status == "pending":  # checked again later
            self.r.rpush(keys.VERIFY_QUEUE, job_id)
            return verdict
        job = job_fields(self.r.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
        workers = sorted({h.worker_id for h in job_route(job)}) if job else []
        pipe = self.r.pipeline(transaction=False)
        if verdict.status == "verified":
            for w in workers:
                pipe.incr(keys.verify_passed(w))
        elif verdict.worker:
            pipe.sadd(keys.VERIFY_SUSPECT, verdict.worker)
        strikes = 0
        if verdict.status == "failed" and verdict.worker:
            strikes = int(self.r.incr(keys.verify_strikes(verdict.worker)))  # type: ignore[arg-type]
            if strikes >= self.settings.verify.ban_after:  # off routes before anyone reads the verdict
                why = f"{strikes} failed checks, the last on job {job_id}: {verdict.reason}"
                pipe.hset(keys.BANNED, verdict.worker, why[:2000])
        status.write(pipe, job_id, verdict.status, **verdict.as_dict())
        pipe.execute()
        log.info("job %s: %s %s", job_id, verdict.status, verdict.reason)
        if verdict.status == "failed" and verdict.worker:
            self._penalize(job_id, verdict, strikes=strikes)
        return verdict

    def _penalize(self, job_id: str, verdict: Verdict, *, strikes: int) -> None:
        """The money side of a failed check: withhold, refund, and past the limit freeze the payouts."""
        assert verdict.worker is not None
        # The job must be billed before its worker's credit can be withheld (the scheduler settles it at the
        # end; the reconciler catches up if the scheduler was down).
        deadline = time.monotonic() + 10 * self.settings.verify.wait_s
        while not self.r.hget(keys.job(job_id), "settled") and time.monotonic() < deadline:
            time.sleep(0.2)
        evidence = {"hop": verdict.hop, **verdict.evidence}
        try:
            self.billing.withhold(job_id=job_id, worker_id=verdict.worker, reason=verdict.reason,
                                  evidence=evidence)
        except AzuError as exc:  # still not settled: the verdict stands, the money waits for an operator
            log.error("job %s: could not withhold %s's earnings (%s); verdict kept", job_id, verdict.worker,
                      exc.message)
        if strikes >= self.settings.verify.ban_after:
            why = f"{strikes} failed checks, the last on job {job_id}: {verdict.reason}"
            self.billing.freeze_worker(worker_id=verdict.worker, reason=why[:2000])
            log.warning("worker %s taken off routes, payouts frozen: %s", verdict.worker, why)


def banned_workers(r: redis.Redis) -> set[str]:
    return {keys.as_str(w) for w in r.hkeys(keys.BANNED)}  # type: ignore[union-attr]


def run(settings: Settings | None = None, *, stop_event: threading.Event | None = None,
        r: redis.Redis | None = None, verifier: Verifier | None = None, wait_s: float = 1.0) -> None:
    """The loop, until ``stop_event`` is set: hold the lease, pop a picked job, check it."""
    settings = settings or get_settings()
    r = r or redis.Redis.from_url(settings.redis_url)
    stop_event = stop_event or threading.Event()
    verifier = verifier or Verifier(r, settings=settings)
    me = uuid.uuid4().hex
    while not stop_event.is_set():
        try:
            held = r.get(keys.VERIFY_LOCK) == me.encode()
            if not held and not r.set(keys.VERIFY_LOCK, me, nx=True, ex=LEASE_S):
                stop_event.wait(1.0)
                continue
            r.expire(keys.VERIFY_LOCK, LEASE_S)
            got: Any = r.blpop([keys.VERIFY_QUEUE], timeout=wait_s)
            if got:
                job_id = keys.as_str(got[1])
                try:
                    verifier.check(job_id)
                except Exception:
                    log.exception("verifier: the check of job %s failed", job_id)
                    status.write(r, job_id, "inconclusive", reason="the verifier failed (see its log)")
        except redis.ConnectionError:
            log.warning("verifier: Redis unavailable; retrying")
            stop_event.wait(1.0)
    if r.get(keys.VERIFY_LOCK) == me.encode():
        r.delete(keys.VERIFY_LOCK)


def start_thread(settings: Settings | None = None, **kwargs: Any) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(settings,), kwargs={"stop_event": stop, **kwargs},
                              name="azu-verifier", daemon=True)
    thread.start()
    return thread, stop

