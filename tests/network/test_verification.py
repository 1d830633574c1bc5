"""Verified work (issue "Verified work"): workers commit to what they computed, the verifier re-computes
picked jobs, pins a wrong answer on the worker that made it, and never on one that did not.

In-process WorkerNodes (tests.support.network.InlineNetwork) with the real collector and verifier on the test
Redis; the cheats (tests.support.cheats) are applied to one node's stage. The same with real worker processes
is bench/verification.py. The ledger side of a verdict (withhold, refund, freeze) has its own tests with
PostgreSQL in tests/ledger; here a recording ``Billing`` stands for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from azu.billing.base import FreeBilling
from azu.config import get_settings
from azu.engine.span import Span
from azu.network import auth, directory, jobs, keys
from azu.network.wire import Report, StepPayload, unpack_inbox
from azu.registry import status as models
from azu.verification import status
from azu.verification.verifier import Verifier, banned_workers
from tests.support import cheats
from tests.support.network import InlineNetwork

pytestmark = [pytest.mark.network]

_ids = itertools.count()


class RecordingBilling(FreeBilling):
    """Stands for the ledger (tested with PostgreSQL in tests/ledger): records what the verifier asked."""

    def __init__(self) -> None:
        self.withheld: list[dict[str, Any]] = []
        self.frozen: list[str] = []

    def withhold(self, *, job_id: str, worker_id: str, reason: str, evidence: dict[str, Any]) -> None:
        self.withheld.append({"job_id": job_id, "worker_id": worker_id, "reason": reason,
                              "evidence": evidence})

    def freeze_worker(self, *, worker_id: str, reason: str) -> None:
        self.frozen.append(worker_id)


@dataclasses.dataclass
class World:
    net: InlineNetwork
    model_id: str
    workers: list[str]
    billing: RecordingBilling
    verifier: Verifier

    def job(self, **kw: Any) -> str:
        for node in self.net.nodes.values():  # a check may outlast the heartbeat TTL on a busy machine
            node.heartbeat()
        self.net.collect()
        job_id = f"jv-{next(_ids)}-{self.model_id}"
        req = jobs.JobRequest(job_id=job_id, user_id="u", model_id=self.model_id,
                              prompt_ids=kw.pop("prompt", [1, 9, 8, 7, 3]),
                              max_tokens=kw.pop("max_tokens", 40), **kw)
        jobs.submit_job(self.net.r, req, dispatch=self.net)
        self.net.run()
        assert jobs.get_job(self.net.r, job_id).status == "done"
        # Billed as the core's scheduler bills an ended job (the verifier withholds only from a billed job).
        assert jobs.bill_ended_job(self.net.r, job_id, billing=self.billing) == "settled"
        return job_id


@pytest.fixture
def world(r: redis.Redis, shard: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``world(spans)``: a fresh in-process network over its own copy of the tiny model, a worker per span."""
    made: list[World] = []

    def make(spans: list[tuple[int, int]], *, wait_s: float = 5.0, **node_options: Any) -> World:
        n = next(_ids)
        model_id = shard(f"tiny-verify-{n}")
        net = InlineNetwork(r)
        folder = models.shard_dir(model_id)
        workers = []
        for i, (first, last) in enumerate(spans):
            wid = f"vw{n}-{i}"
            net.add(wid, folder, model_id, first, last, 4, **node_options)
            workers.append(wid)
        settings = get_settings()
        settings = dataclasses.replace(settings, verify=dataclasses.replace(settings.verify, wait_s=wait_s))
        billing = RecordingBilling()
        w = World(net, model_id, workers, billing,
                  Verifier(r, settings=settings, dispatch=net, billing=billing, pump=net.run))
        made.append(w)
        return w

    yield make
    for w in made:
        for wid in w.workers:
            directory.deregister(r, wid)
            r.hdel(keys.BANNED, wid)
        r.delete(InlineNetwork.VERIFY_QUEUE)


def _stage(w: World, hop: int) -> Any:
    node = w.net.nodes[w.workers[hop]]
    return next(iter(node.stages.values()))


def test_honest_jobs_are_picked_and_verified(r, world) -> None:
    """Greedy and seeded-sampled jobs through 3 honest workers: picked (new workers: every job), re-computed,
    verified; nobody's pay is touched and the checks raise each worker's passed count."""
    w = world([(0, 1), (1, 3), (3, 4)])
    greedy = w.job()
    sampled = w.job(temperature=0.9, top_k=50, top_p=0.95, seed=77)
    stopped = w.job(max_tokens=12, stop_token_ids=[jobs.get_job(r, greedy).token_ids[5]])  # ends on a stop id
    for job_id in (greedy, sampled, stopped):
        assert status.read(r, job_id) == {"status": "pending"}
        assert r.lrem(InlineNetwork.VERIFY_QUEUE, 0, job_id) == 1
        verdict = w.verifier.check(job_id)
        assert verdict.status == "verified", verdict
        assert status.read(r, job_id)["status"] == "verified"
    assert w.billing.withheld == [] and w.billing.frozen == []
    assert all(int(r.get(keys.verify_passed(wid))) == 3 for wid in w.workers)
    assert w.verifier.compute_s > 0


@pytest.mark.parametrize("kind", cheats.HIDDEN_KINDS)
def test_a_cheating_middle_stage_is_caught_and_named(r, world, kind) -> None:
    w = world([(0, 1), (1, 3), (3, 4)])
    cheats.corrupt_stage(_stage(w, 1), kind)
    job_id = w.job()
    verdict = w.verifier.check(job_id)
    assert verdict.status == "failed", verdict
    assert (verdict.hop, verdict.worker) == (1, w.workers[1])
    assert [(x["job_id"], x["worker_id"]) for x in w.billing.withheld] == [(job_id, w.workers[1])]
    shown = status.read(r, job_id)
    assert shown["status"] == "failed" and shown["worker"] == w.workers[1] and "hop 1" in shown["reason"]
    assert r.sismember(keys.VERIFY_SUSPECT, w.workers[1])
    assert not r.sismember(keys.VERIFY_SUSPECT, w.workers[0])
    assert not r.sismember(keys.VERIFY_SUSPECT, w.workers[2])


def test_a_prompt_handed_on_in_parts_is_checked_and_its_parts_are_evidence(r, world, monkeypatch) -> None:
    """Prompts run in chunks of 2 and each chunk goes on as it runs, so hop 1 gets the prompt in parts: an
    honest job is verified, and a framing hop 0 is still named from hop 1's kept parts."""
    import azu.network.node as node_module

    prompt = [1, *range(40, 60)]
    w = world([(0, 2), (2, 4)], prefill_chunk=2)
    assert w.verifier.check(w.job(prompt=prompt, max_tokens=12)).status == "verified"
    monkeypatch.setattr(node_module, "pack_tensor", cheats.framing_pack(node_module.pack_tensor))
    job_id = w.job(prompt=prompt, max_tokens=12)
    kept = w.net.nodes[w.workers[1]].evidence.take(job_id, 0)
    firsts = [StepPayload.unpack(b) for blob in kept for b in unpack_inbox(blob).steps]
    assert sorted(p.pos for p in firsts if p.step == 0) == [0, 8, 16]  # the prompt's parts (4 chunks of 2)
    verdict = w.verifier.check(job_id)
    assert (verdict.status, verdict.hop, verdict.worker) == ("failed", 0, w.workers[0]), verdict
    assert verdict.evidence["first_mismatch_hop"] == 1


def test_a_cheating_first_stage_is_named_without_evidence(r, world) -> None:
    """Hop 0's input is the token ids, which the core knows: no evidence needed to pin it."""
    w = world([(0, 2), (2, 4)])
    cheats.corrupt_stage(_stage(w, 0), "noise")
    verdict = w.verifier.check(w.job())
    assert (verdict.status, verdict.hop, verdict.worker) == ("failed", 0, w.workers[0])


def test_one_wrong_token_in_fifty_is_caught(r, world, monkeypatch) -> None:
    """The last stage commits to honest logits but publishes another token at one step: the token check."""
    import azu.engine.sampling as sampling

    w = world([(0, 2), (2, 4)])
    monkeypatch.setattr(sampling, "sample", cheats.wrong_token_sampler(sampling.sample))
    verdict = w.verifier.check(w.job(max_tokens=50, stop_token_ids=[]))
    assert (verdict.status, verdict.hop, verdict.worker) == ("failed", 1, w.workers[1])
    assert "token at step 7" in json.dumps(verdict.evidence)


def test_a_framing_sender_is_blamed_not_the_hop_it_framed(r, world, monkeypatch) -> None:
    """Hop 0 commits to its honest output but sends other numbers: hop 1's output then disagrees with the
    re-computation. Hop 1's kept bundles (signed by hop 0) show hop 1 computed right from what it got, and
    that hop 0 sent what its layers did not produce: hop 0 is named, hop 1 is not."""
    import azu.network.node as node_module

    w = world([(0, 2), (2, 4)])
    monkeypatch.setattr(node_module, "pack_tensor", cheats.framing_pack(node_module.pack_tensor))
    verdict = w.verifier.check(w.job())
    assert (verdict.status, verdict.hop, verdict.worker) == ("failed", 0, w.workers[0]), verdict
    assert verdict.evidence["first_mismatch_hop"] == 1
    assert [x["worker_id"] for x in w.billing.withheld] == [w.workers[0]]


def test_without_evidence_nobody_is_penalized(r, world, monkeypatch) -> None:
    """The framed hop lost its kept bundles (a restart, say): the verdict is inconclusive, nobody's pay is
    withheld, and both are suspect (every later job of theirs is checked)."""
    import azu.network.node as node_module

    w = world([(0, 2), (2, 4)], wait_s=1.0)
    monkeypatch.setattr(node_module, "pack_tensor", cheats.framing_pack(node_module.pack_tensor))
    job_id = w.job()
    victim = w.net.nodes[w.workers[1]]
    victim.evidence = type(victim.evidence)(max_bytes=0, max_age_s=0)
    verdict = w.verifier.check(job_id)
    assert verdict.status == "inconclusive" and w.billing.withheld == []
    assert status.read(r, job_id)["status"] == "inconclusive"
    assert r.sismember(keys.VERIFY_SUSPECT, w.workers[1])


def test_repeated_failures_ban_the_worker_and_freeze_its_payouts(r, world) -> None:
    w = world([(0, 2), (2, 4)])
    cheats.corrupt_stage(_stage(w, 1), "zeros")
    first = w.verifier.check(w.job())
    assert first.status == "failed" and w.workers[1] not in banned_workers(r)
    second = w.verifier.check(w.job())
    assert second.status == "failed"
    assert w.workers[1] in banned_workers(r) and w.billing.frozen == [w.workers[1]]
    assert w.workers[1] not in {x.worker_id for x in directory.live_workers(r)}  # off routes
    assert "2 failed checks" in r.hget(keys.BANNED, w.workers[1]).decode()


def test_a_commitment_cannot_be_changed_or_made_by_another(r, world) -> None:
    w = world([(0, 2), (2, 4)])
    job_id = w.job()
    stored = r.hget(keys.commits(job_id), "0:0:0")
    assert stored is not None
    hop0, hop1 = (w.net.nodes[x] for x in w.workers)
    body = dict(Report.unpack(stored).body)
    # The same worker sends another commitment for a chunk it already committed: the first one stays.
    forged = dict(body, data=Report.unpack(r.hget(keys.commits(job_id), "0:1:0")).body["data"])
    hop0.report("commit", forged)
    w.net.collect()
    assert r.hget(keys.commits(job_id), "0:0:0") == stored
    # Hop 1's worker commits for hop 0: refused (it is not hop 0 of the route).
    r.hdel(keys.commits(job_id), "0:0:0")
    hop1.report("commit", body)
    w.net.collect()
    assert r.hget(keys.commits(job_id), "0:0:0") is None
    # A signed evidence order is needed to get a worker's kept bundles.
    own = keys.reports_from(hop1.worker_id, InlineNetwork.REPORTS)
    before = r.llen(own)
    hop1.send_evidence(job_id=job_id, epoch=0, sig=b"\x00" * 64)
    got = [Report.unpack(b).kind for b in r.lrange(own, before, -1)]
    assert got == ["refused"]
    assert auth.EVIDENCE_ORDER != auth.END_ORDER


def test_commitments_are_small(r, world) -> None:
    w = world([(0, 2), (2, 4)])
    job_id = w.job(max_tokens=64, stop_token_ids=[])
    sizes = [len(Report.unpack(v).body["data"]) for k, v in r.hgetall(keys.commits(job_id)).items()
             if not k.endswith(b"final")]
    rows = 5 + 64 - 1
    assert sum(sizes) < 2 * rows * 8 * 8 + 2 * 6 * 64  # 8 (int32, float32) pairs per row and hop, + framing
    assert Span(0, 2, True, False) in {s for _m, s in w.net.nodes[w.workers[0]].stages}


def test_a_live_worker_that_does_not_commit_fails_the_check(r, world) -> None:
    """Not committing is no way out: a worker still alive past the deadline without its commitments fails."""
    w = world([(0, 2), (2, 4)], wait_s=1.0)
    silent = w.net.nodes[w.workers[1]]
    silent._commit_reports = lambda *a, **k: []  # type: ignore[method-assign]
    job_id = w.job()
    # Within the grace after the job's end a busy worker may still send them: the job goes back on the queue.
    first = w.verifier.check(job_id)
    assert first.status == "pending" and r.lrange(keys.VERIFY_QUEUE, -1, -1) == [job_id.encode()]
    r.lrem(keys.VERIFY_QUEUE, 0, job_id)
    r.hset(keys.job(job_id), "finished", str(float(r.hget(keys.job(job_id), "finished")) - 3600))
    verdict = w.verifier.check(job_id)
    assert (verdict.status, verdict.hop, verdict.worker) == ("failed", 1, w.workers[1])
    assert verdict.evidence == {"missing_commitment": True}
    # Banned since (it still heartbeats): its silence on a later job is not judged again.
    later = w.job()
    r.hset(keys.job(later), "finished", str(float(r.hget(keys.job(later), "finished")) - 3600))
    r.hset(keys.BANNED, w.workers[1], "banned by the test")
    try:
        assert w.verifier.check(later).status == "inconclusive"
    finally:
        r.hdel(keys.BANNED, w.workers[1])


def test_commitments_out_of_bounds_and_unasked_evidence_are_refused(r, world) -> None:
    import numpy as np

    from azu.verification.commitment import RowCommitment

    w = world([(0, 2), (2, 4)])
    job_id = w.job(max_tokens=8)
    hop0 = w.net.nodes[w.workers[0]]
    big = RowCommitment(np.zeros((4096, 8), "<i4"), np.zeros((4096, 8), "<f4")).pack()
    one = RowCommitment(np.zeros((1, 8), "<i4"), np.zeros((1, 8), "<f4")).pack()
    for first, data in ((64, big), (3, one), (10_000, one)):
        hop0.report("commit", {"job_id": job_id, "epoch": 0, "hop": 0, "first": first, "data": data,
                               "final": False})
        w.net.collect()
        assert r.hget(keys.commits(job_id), f"0:0:{first}") is None
    # Evidence nobody asked for is not stored.
    hop1 = w.net.nodes[w.workers[1]]
    hop1.report("evidence", {"job_id": job_id, "epoch": 0, "bundles": [b"x" * 1000]})
    w.net.collect()
    assert not r.exists(keys.evidence(job_id, w.workers[1]))


def test_the_verification_settings_come_from_the_environment(monkeypatch) -> None:
    """get_settings() is cached per environment: every AZU_VERIFY_* variable must be part of its key (a core
    started with AZU_VERIFY_RATE=1 once checked a third of its jobs)."""
    from azu.config import SettingsError

    monkeypatch.setenv("AZU_VERIFY_RATE", "1")
    monkeypatch.setenv("AZU_VERIFY_NEW_JOBS", "3")
    monkeypatch.setenv("AZU_EVIDENCE_S", "5")
    v = get_settings().verify
    assert (v.rate, v.new_jobs, v.evidence_s) == (1.0, 3, 5.0)
    monkeypatch.setenv("AZU_VERIFY_RATE", "0")  # checks off (new workers' jobs still checked)
    assert get_settings().verify.rate == 0.0
    for bad in ("2", "-0.1", "often"):
        monkeypatch.setenv("AZU_VERIFY_RATE", bad)
        with pytest.raises(SettingsError):
            get_settings()


def test_a_rerouted_job_is_checked_on_its_last_route(r, world) -> None:
    """A job re-routed after a loss (new epoch, the prefix replayed from position 0 on the new route) is
    checked on the route that produced its whole sequence: honest, it verifies; the lost worker is not
    judged."""
    w = world([(0, 2), (2, 4), (2, 4)])
    job_id = f"jv-{next(_ids)}-{w.model_id}"
    req = jobs.JobRequest(job_id=job_id, user_id="u", model_id=w.model_id, prompt_ids=[1, 9, 8, 7],
                          max_tokens=24, temperature=0.8, top_k=40, seed=5, stop_token_ids=[])
    jobs.submit_job(r, req, dispatch=w.net)
    w.net.step_until(job_id, 6)
    victim = jobs.job_route(jobs._hash(r, job_id))[1].worker_id
    dead = w.net.nodes.pop(victim)
    directory.mark_lost(r, [victim])
    assert jobs.reroute_job(r, job_id, [victim], dispatch=w.net)
    w.net.run()
    assert jobs.get_job(r, job_id).status == "done"
    assert int(r.hget(keys.job(job_id), "epoch")) == 1
    verdict = w.verifier.check(job_id)
    assert verdict.status == "verified", verdict
    assert victim not in {h.worker_id for h in jobs.job_route(jobs._hash(r, job_id))}
    w.net.nodes[victim] = dead
    r.zrem(directory.LOST, victim)


def test_parts_the_hop_dropped_are_not_taken_for_its_input(r, world) -> None:
    """Hop 0 signs right rows for positions 4-7 and sends them first (they leave a gap: hop 1 drops them),
    then positions 0-3, then other rows for 4-7, which hop 1 runs. The verifier rebuilds the input hop 1 ran
    from its kept bundles, in their order and by hop 1's own rules, not the first rows signed for each
    position: the sender cannot have hop 1 blamed for numbers it was not given."""
    import time

    import torch

    from azu.network import batching
    from azu.network.inbox import Inbox
    from azu.network.wire import Hop, JobGrant, Sampling, pack_tensor
    from azu.verification.verifier import _Job

    w = world([(0, 2), (2, 4)])
    sender, hop1 = (w.net.nodes[x] for x in w.workers)
    route = (Hop(w.workers[0], Span(0, 2, True, False)), Hop(w.workers[1], Span(2, 4, False, True)))
    job_id = f"jv-frame-{next(_ids)}"
    sampling = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=(), stop_ids=(),
                        prompt_len=8)
    grant = JobGrant(job_id, w.model_id, "", route, (sender.public_key, hop1.public_key), sampling, 0,
                     time.time() + 600)
    grant_bytes = grant.pack()
    grant_sig = auth.sign(auth.core_signing_key(), auth.GRANT, grant_bytes)
    right, first, wrong = torch.randn(4, 64), torch.randn(4, 64), torch.randn(4, 64)

    def signed(pos: int, rows: torch.Tensor) -> bytes:
        part = StepPayload(job_id, 0, 1, pos, pack_tensor(rows), grant_bytes, grant_sig)
        return jobs.bundles([part], sender=w.workers[0], key=sender.key)[w.workers[1]]

    ran: list[torch.Tensor] = []
    stage = _stage(w, 1)
    forward = stage.forward

    def watched(job: str, x: torch.Tensor, **kw: Any) -> Any:
        ran.append(x.clone())
        return forward(job, x, **kw)

    stage.forward = watched
    try:
        held = batching.StepQueue(chunk=128)
        for blob in (signed(4, right), signed(0, first), signed(4, wrong)):
            hop1._process([blob], held)
            while held.runnable():
                hop1._process([], held)
    finally:
        del stage.forward
    assert torch.equal(torch.cat(ran), torch.cat([first, wrong]))  # what hop 1 ran
    kept = hop1.evidence.take(job_id, 0)
    assert len(kept) == 3
    # As the collector keeps it when the verifier asks (azu.network.collector): hop 1's signed report.
    r.set(keys.evidence(job_id, w.workers[1]),
          hop1.signed_report("evidence", {"job_id": job_id, "epoch": 0, "bundles": kept}))
    job = _Job(job_id, w.model_id, route, grant, grant_bytes, 0, list(range(8)), [5], sampling)
    rows = w.verifier.evidence_input(job, 1, time.monotonic() + 5)
    assert torch.equal(rows, torch.cat([first, wrong]))
    for worker_id in w.workers:
        Inbox(r, worker_id).clear()
    hop1._drop_caches(job_id)
