"""Issue "Open network": a worker can neither mint, nor forge, nor write the facts. Each attack runs for real
against the cluster (real Redis, real Celery worker processes, the core's collector) and must be refused with
nothing changed. The attacker holds an enrolled worker's key (w3's, or a hop's own) and a Redis connection;
the Redis ACL that forbids its raw writes is tested with enrollment (tests/security).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

from azu.engine.span import Span
from azu.network import auth, directory, dispatch, inbox, jobs, keys, reports
from azu.network.wire import EndOrder, Hop, JobGrant, Report, Sampling, StepPayload, end_order_part
from tests.network.test_pipeline import collect, load_layout, submit
from tests.support import wait_for
from tests.support.network import Cluster, Recording

pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = [1, 40, 50, 60]
ROUTE = (Hop("w1", Span(0, 2, True, False)), Hop("w2", Span(2, 4, False, True)))


class Ledger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def settle(self, *, job_id: str, usage: dict[str, int]) -> None:
        self.calls.append(("settle", usage))

    def release(self, *, job_id: str) -> None:
        self.calls.append(("release", job_id))


@pytest.fixture(scope="module")
def model(cluster: Cluster, celery_dispatch: Any, shard: Any) -> str:
    model_id = shard("tiny-trust")
    load_layout(cluster, celery_dispatch, model_id, {"w1": (0, 2), "w2": (2, 4)})
    return model_id


def key_of(cluster: Cluster, worker_id: str) -> SigningKey:
    """The attacker's key: an enrolled worker's own (its key file)."""
    return auth.load_worker_key(cluster.base / "keys" / f"{worker_id}.key")


def report(worker_id: str, kind: str, body: dict[str, Any], key: SigningKey | None) -> bytes:
    """Signed with ``key``; with None, a signature of zeros."""
    if key is not None:
        return reports.sign(key, worker_id, kind, body)
    return Report(worker_id, kind, body, b"\0" * 64).pack()


def send_reports(r: Any, *blobs: bytes) -> None:
    """Push each report onto the list of the worker it names, with a hint: the strongest forger, as if it
    could write there (a worker's login writes only its own list: a report there that names another worker
    is refused before its signature is read, tests/security/test_attack_stop_network.py)."""
    for blob in blobs:
        reports.push(r, Report.unpack(blob).worker_id, [blob])


def synced(cluster: Cluster, worker_id: str = "w3") -> None:
    """Wait until the collector has handled every report pushed before this call (a pong after them: its
    hint is behind theirs)."""
    marker = f"{keys.PING_PREFIX}sync-{uuid.uuid4().hex[:8]}"
    send_reports(cluster.r, report(worker_id, "pong", {"key": marker, "value": "1"},
                                   key_of(cluster, worker_id)))
    wait_for(lambda: cluster.r.get(marker), what="the collector to reach the sync report")


class WithoutSettle:
    """A dispatcher that sends everything but the settle task (the test settles the job itself)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def send_task(self, name: str, **kwargs: Any) -> None:
        if name != dispatch.SETTLE:
            self.inner.send_task(name, **kwargs)


def refusals(r: Any, worker_id: str) -> int:
    return int(r.get(keys.refused(worker_id)) or 0)


def running_job(r: Any, model_id: str, max_tokens: int = 8) -> str:
    """A job granted its route (w1 -> w2) whose first step is never delivered: it stays running."""
    real = inbox.deliver
    # Hand nothing over; the caller's own writes on the pipeline (the job's running state) still go.
    inbox.deliver = lambda pipe, *_a, **_k: pipe.execute()  # type: ignore[assignment]
    try:
        return submit(r, Recording(None), model_id, PROMPT, max_tokens)
    finally:
        inbox.deliver = real


def grant_for(r: Any, job_id: str, model_id: str, *, key: SigningKey | None = None,
              expires_at: float | None = None, public_keys: tuple[str, ...] | None = None,
              **sampling: Any) -> tuple[bytes, bytes]:
    """A grant for ``job_id`` on w1 -> w2, signed by ``key`` (default: the core's)."""
    pubs = public_keys or tuple(keys.as_str(r.get(keys.identity(h.worker_id))) for h in ROUTE)
    gen = Sampling(max_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=(), stop_ids=(),
                   prompt_len=len(PROMPT))
    gen = Sampling(**{**gen.__dict__, **sampling})
    expires_at = time.time() + 600 if expires_at is None else expires_at
    grant = JobGrant(job_id=job_id, model_id=model_id, manifest_sha256="", route=ROUTE, public_keys=pubs,
                     sampling=gen, epoch=0, expires_at=expires_at)
    packed = grant.pack()
    return packed, auth.sign(key or auth.core_signing_key(), auth.GRANT, packed)


def send(r: Any, steps: list[StepPayload], *, sender: str, key: SigningKey, dispatch_: Any) -> None:
    inbox.deliver(r.pipeline(transaction=False), jobs.bundles(steps, sender=sender, key=key),
                  dispatch=dispatch_)


def first_step(job_id: str, grant: tuple[bytes, bytes], **kw: Any) -> StepPayload:
    return StepPayload(**{"job_id": job_id, "step": 0, "hop": 0, "pos": 0, "x": PROMPT, "grant": grant[0],
                          "grant_sig": grant[1], **kw})


# --- (1) inflated pay ---------------------------------------------------------------------------------------
def test_usage_a_worker_writes_is_not_billed(r, cluster, celery_dispatch, model) -> None:
    job_id = submit(r, celery_dispatch, model, PROMPT, 6)
    r.hincrby(keys.usage(job_id), "w1", 10**12)  # the old per-job usage counter, written by the attacker
    tokens, events = collect(r, job_id)
    per_worker = (len(PROMPT) + len(tokens) - 1) * 2
    expected = {"w1": per_worker, "w2": per_worker}
    assert events[-1].usage["workers"] == expected
    wait_for(lambda: r.hget(keys.job(job_id), "settled") == b"settled", what="settlement")
    end = jobs.signed_end(jobs._hash_raw(r, job_id))
    assert end is not None and end["usage"]["workers"] == expected
    # What the scheduler bills from: the same usage, whatever the usage hash says.
    r.hdel(keys.job(job_id), "settled")
    ledger = Ledger()
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "settled"
    assert ledger.calls == [("settle", expected)]


# --- (2) forged settlement ----------------------------------------------------------------------------------
def test_forged_end_is_not_settled_and_the_true_end_settles_once(r, cluster, celery_dispatch, model) -> None:
    job_id = running_job(r, model)
    attacker = key_of(cluster, "w2")
    fake = json.dumps({"job_id": job_id, "status": "done", "reason": "stop",
                       "usage": {"workers": {"w2": 10**9}}}, sort_keys=True)
    forged_sig = auth.sign(attacker, auth.END_RECORD, fake.encode())
    r.hset(keys.job(job_id), mapping={"status": "done", "usage": json.dumps({"workers": {"w2": 10**9}}),
                                      "end": fake, "end_sig": forged_sig})
    before = cluster.log("core").count("'not finished'")
    dispatch.send_settle(job_id, dispatch=celery_dispatch)
    wait_for(lambda: cluster.log("core").count("'not finished'") > before, what="the scheduler's settle task")
    assert not r.hexists(keys.job(job_id), "settled")
    ledger = Ledger()
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "not finished" and ledger.calls == []
    # The true end (the core fails it: nothing was computed) settles once, with the core's usage.
    r.hset(keys.job(job_id), "status", "running")
    # The test bills the job itself (no settle task), but the end orders the core puts in w1's and w2's
    # inboxes must wake them, or their wake keys would stay set and later steps wait for the keys to expire.
    assert jobs.fail_job(r, job_id, "test: ended by the core", dispatch=WithoutSettle(celery_dispatch))
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "released"
    assert jobs.bill_ended_job(r, job_id, billing=ledger) == "already settled"
    assert ledger.calls == [("release", job_id)]


# --- (3) ghost worker ---------------------------------------------------------------------------------------
def test_ghost_claiming_every_layer_gets_no_job(r, cluster, shard) -> None:
    model_id = shard("tiny-ghost")
    everything = [[model_id, 0, 4, True, True]]
    ghost = SigningKey.generate()
    # No free memory claimed: what is tested is the claim of layers, not a bid for load orders.
    body = {"device": "H100", "total_memory": 1 << 40, "free_memory": 0, "stages": everything,
            "cached_jobs": 0, "started_at": time.time(), "public_key": auth.public_hex(ghost)}
    r.set(keys.identity("ghost"), auth.public_hex(ghost))  # enrolled: a worker like any other
    send_reports(r, report("ghost", "heartbeat", body, ghost))
    # Not enrolled at all: its heartbeat is not even read.
    send_reports(r, report("ghost3", "heartbeat", body, ghost))
    # A record written straight into the directory, with a fresh heartbeat, claiming the same.
    directory.register(r, directory.WorkerInfo(worker_id="ghost2", queue="gpu.ghost2", device="H100",
                                               total_memory=1 << 40, free_memory=0,
                                               stages=[(model_id, Span(0, 4, True, True))]))
    r.set(keys.identity("ghost2"), auth.public_hex(SigningKey.generate()))
    synced(cluster)
    assert directory.get_worker(r, "ghost").stages == []  # the collector kept no unordered claim
    assert directory.get_worker(r, "ghost3") is None and not r.exists(keys.identity("ghost3"))
    live = {w.worker_id: w for w in directory.live_workers(r)}
    assert live["ghost"].holds(model_id) == [] and live["ghost2"].holds(model_id) == []
    rec = Recording(None)
    job_id = submit(r, rec, model_id, PROMPT, 4)
    assert rec.count(dispatch.FORWARD) == 0 and jobs.get_job(r, job_id).status == "queued"
    loads = {queue for name, queue, _ in rec.sent if name == dispatch.LOAD}
    assert loads and not loads & {"ctl.ghost", "ctl.ghost2"}  # the layers are ordered from real workers
    assert not r.hexists(keys.job(job_id), "grant")
    jobs.cancel_job(r, job_id, dispatch=rec)
    for wid in ("ghost", "ghost2"):
        directory.deregister(r, wid)


# --- (5) forged reports and orders --------------------------------------------------------------------------
def test_forged_token_reports_change_no_stream(r, cluster, celery_dispatch, model) -> None:
    job_id = running_job(r, model)
    body = {"job_id": job_id, "epoch": 0, "step": 0, "token": 7}
    send_reports(r, report("w1", "token", body, key_of(cluster, "w1")),  # a hop, but not the last
                 report("w2", "token", body, None),  # unsigned
                 report("w2", "token", body, key_of(cluster, "w3")),  # signed by another worker's key
                 report("w2", "token", {**body, "step": 3}, key_of(cluster, "w2")))  # skips ahead
    synced(cluster)
    assert r.xlen(keys.events(job_id)) == 0 and r.hget(keys.job(job_id), "step") == b"0"
    # The last hop's own report is published (so the refusals above are not a broken collector).
    send_reports(r, report("w2", "token", body, key_of(cluster, "w2")))
    synced(cluster)
    assert r.xlen(keys.events(job_id)) == 1 and r.hget(keys.job(job_id), "step") == b"1"
    jobs.fail_job(r, job_id, "test over", dispatch=celery_dispatch)  # its end orders must wake w1 and w2


def test_minted_end_job_does_not_drop_a_live_cache(r, cluster, celery_dispatch, model) -> None:
    """w1 holds the prefill of a job whose second hop names a key w2 does not have (the job stops there)."""
    job_id = f"live-{uuid.uuid4().hex[:8]}"
    grant = grant_for(r, job_id, model, public_keys=(keys.as_str(r.get(keys.identity("w1"))), "00" * 32))
    jobs.send_steps(r, [first_step(job_id, grant)], dispatch=celery_dispatch)

    def w1_caches() -> int:
        w1 = directory.get_worker(r, "w1")
        return w1.cached_jobs if w1 else 0

    wait_for(lambda: w1_caches() >= 1, what="w1 to hold the job's cache")
    refused = refusals(r, "w1")
    sig_by_worker = auth.sign(key_of(cluster, "w3"), auth.END_ORDER, end_order_part(job_id, 0))
    dispatch.send_end_job("w1", job_id=job_id, epoch=0, sig=sig_by_worker, dispatch=celery_dispatch)
    dispatch.send_end_job("w1", job_id=job_id, epoch=0, sig=b"\0" * 64, dispatch=celery_dispatch)
    # The same orders where the core now sends them, in w1's inbox: any worker may write there (hand-overs).
    for sig in (sig_by_worker, b"\0" * 64):
        inbox.deliver(r.pipeline(transaction=False), {"w1": EndOrder(job_id=job_id, epoch=0, sig=sig).pack()},
                      dispatch=celery_dispatch)
    wait_for(lambda: refusals(r, "w1") >= refused + 4, what="w1 to refuse all four orders")
    seen = time.time()
    wait_for(lambda: directory.get_worker(r, "w1").heartbeat_at > seen + 0.1, what="a later heartbeat")
    assert w1_caches() >= 1
    # The core's own order frees it.
    jobs.end_caches(r, job_id, ROUTE, dispatch=celery_dispatch)
    wait_for(lambda: w1_caches() == 0, what="the core's end_job to free the cache")


# --- (6) minted and tampered grants -------------------------------------------------------------------------
def test_self_signed_expired_and_tampered_grants_are_refused(r, cluster, celery_dispatch, model) -> None:
    attacker = key_of(cluster, "w3")
    ids = [f"mint-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    minted = first_step(ids[0], grant_for(r, ids[0], model, key=attacker))  # signed by a worker key
    expired = first_step(ids[1], grant_for(r, ids[1], model, expires_at=time.time() - 1))
    real = grant_for(r, ids[2], model)
    raw = msgpack.unpackb(real[0], raw=False)
    raw["gen"]["temperature"] = 1.5  # the core granted greedy sampling
    tampered = first_step(ids[2], (msgpack.packb(raw, use_bin_type=True), real[1]))
    wrong_pos = first_step(ids[3], grant_for(r, ids[3], model), pos=2)
    later_step = first_step(ids[4], grant_for(r, ids[4], model), step=1)  # step 1 must be at pos len(prompt)
    refused = refusals(r, "w1")
    send(r, [minted, expired, tampered, wrong_pos, later_step], sender="core", key=auth.core_signing_key(),
         dispatch_=celery_dispatch)
    # The minted grant sent as from w3 (not on the route); a real grant in a bundle w3 signed as "core".
    send(r, [minted], sender="w3", key=attacker, dispatch_=celery_dispatch)
    send(r, [first_step(ids[5], grant_for(r, ids[5], model))], sender="core", key=attacker,
         dispatch_=celery_dispatch)
    wait_for(lambda: refusals(r, "w1") >= refused + 7, what="w1 to refuse every payload")
    synced(cluster)
    for job_id in ids:
        assert r.xlen(keys.events(job_id)) == 0 and not r.exists(keys.job(job_id))
        assert jobs.bill_ended_job(r, job_id, billing=Ledger()) == "unknown"  # no ledger row can come of it
    assert directory.get_worker(r, "w1").cached_jobs == 0


# --- (7) a message that would take the reader's memory ----------------------------------------------------
def _peak_mb(pid: int) -> float:
    """The process's peak resident memory since ``_reset_peak`` (VmHWM), in MB."""
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 - procfs, read at once
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the current size


def test_messages_of_a_million_objects_cost_their_readers_little(r, cluster, celery_dispatch, model,
                                                                   reference) -> None:
    """With w3's key and the writes its broker login has (another worker's inbox and Celery queue, the
    report list), the attacker pushes 16 MiB messages whose every byte is an object: read without limits,
    each would cost its reader 1.1 GB. Each is refused at the reader's limits, costing about the copies of
    its bytes on the way in; the victim worker and the core's collector stay up, and the next job through
    the victim is still transformers' greedy answer."""
    import base64
    import zlib

    n = 16 << 20
    objects = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n  # an array of 16 Mi empty maps
    sig = b"\xa3sig\xc4\x40" + b"s" * 64
    victim, core = cluster.procs["w2"].pid, cluster.procs["core"].pid
    envelope = {"body": base64.b64encode(objects).decode(), "content-encoding": "binary",
                "content-type": "application/x-msgpack",
                "headers": {"lang": "py", "task": dispatch.FORWARD, "id": uuid.uuid4().hex, "origin": "w3",
                            "root_id": None, "parent_id": None, "group": None, "argsrepr": "",
                            "kwargsrepr": "", "retries": 0},
                "properties": {"delivery_tag": uuid.uuid4().hex, "body_encoding": "base64", "priority": 0,
                               "delivery_info": {"exchange": "", "routing_key": "gpu.w2"}}}

    def inbox_bomb(blob: bytes) -> Any:  # what a hand-over writes, with a wake-up if w2 is idle
        refused = refusals(r, "w2")
        inbox.deliver(r.pipeline(transaction=False), {"w2": blob}, dispatch=celery_dispatch)
        return lambda: wait_for(lambda: refusals(r, "w2") > refused, what="w2 to refuse the bundle")

    def report_bomb(blob: bytes) -> Any:  # w3's own report list: the collector pops and reads each
        reports.push(r, "w3", [blob])
        return lambda: synced(cluster)

    def task_bomb(message: dict[str, Any]) -> Any:  # kombu's Redis envelope, as a worker's login may LPUSH it
        taken = cluster.log("w2").count("Traceback")
        r.lpush("gpu.w2", json.dumps(message))
        return lambda: wait_for(lambda: cluster.log("w2").count("Traceback") > taken,
                                what="w2 to refuse the task message")

    # 256 MiB of zeros in 255 KiB of zlib (1 GiB in 785 bytes of bzip2 cost 2151 MB in the attacker's
    # review): kombu unpacks what the compression header names as it reads the message.
    packer, zeros = zlib.compressobj(9), bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    compressed = {**envelope, "body": base64.b64encode(bomb).decode(),
                  "headers": {**envelope["headers"], "id": uuid.uuid4().hex, "compression": "zlib"}}

    attacks = {
        "a bundle's steps": (victim, lambda: inbox_bomb(b"\x83\xa4from\xa2w3\xa5steps" + objects + sig)),
        "a step of a bundle": (victim,
                               lambda: inbox_bomb(b"\x83\xa4from\xa2w3\xa5steps\x91" + objects + sig)),
        "a report": (core, lambda: report_bomb(objects)),
        "a token report's body": (core, lambda: report_bomb(b"\x84\xa1w\xa2w3\xa1k\xa5token\xa1b" + objects
                                                            + sig)),
        "a Celery task's body": (victim, lambda: task_bomb(envelope)),
        "a compressed Celery task": (victim, lambda: task_bomb(compressed)),
    }
    grown = {}
    for what, (pid, attack) in attacks.items():
        _reset_peak(pid)
        base = _peak_mb(pid)
        attack()()
        grown[what] = round(_peak_mb(pid) - base)
    assert cluster.procs["w2"].poll() is None and cluster.procs["core"].poll() is None
    # Unbounded, each one: over 1100 MB. What is left is the message's copies on its way in: about two of
    # its 16 MiB for azu's readers; for a Celery message, kombu's copies of its 22 MiB JSON envelope (the
    # text, decoded, the base64 body, its bytes; kombu reads the envelope itself, without limits:
    # docs/security.md).
    celery = grown.pop("a Celery task's body")
    assert all(mb < 64 for mb in grown.values()) and celery < 320, (sorted(grown.items()), celery)
    assert "compressed message" in cluster.log("w2")
    # Still serving, and still exact.
    job_id = submit(r, celery_dispatch, model, PROMPT, 6)
    tokens, events = collect(r, job_id)
    assert events[-1].kind == "done" and tokens == reference(PROMPT, 6)
