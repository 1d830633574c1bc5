"""Recovery that needs a load (issue "Survive faults"): the placement keeps every span servable.

- A job whose lost span no live worker holds waits while the span is loaded on a worker with room, then
  carries on with its prefix replayed: the tokens of a run without the fault, charged once.
- A worker that restarts empty is ordered its span again; an order in flight is not sent twice; a worker
  whose load failed is left out for a while.
- Placement plans only what is missing: a restarted worker's span, a lost middle span, spare copies.

The in-process tests use InlineNetwork (real Redis, real WorkerNodes, the real collector) and load a span
when the test sees its load order; the real-process test is in test_faults.py.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from nacl.signing import SigningKey

from azu.config import get_settings
from azu.engine.span import Span
from azu.network import auth, directory, dispatch, jobs, keys, placement, watchdog
from azu.network.directory import WorkerInfo
from azu.network.node import WorkerNode
from azu.network.placement import ModelShape
from azu.registry import status as models
from tests.support.network import InlineNetwork, Recording, heartbeat, noted_places, noted_reads

pytestmark = [pytest.mark.network]

SHAPE = ModelShape("m", layer_bytes=(100,) * 8, embeddings_bytes=40, head_bytes=40)


def _worker(wid: str, free: int, *stages: tuple[str, Span]) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, queue=f"gpu.{wid}", device="cpu", total_memory=free, free_memory=free,
                      stages=list(stages))


def _plan(workers: list[WorkerInfo], copies: int = 1, **kw: Any) -> list[tuple[str, Span]]:
    return [(o.worker_id, o.span) for o in placement.plan_loads(SHAPE, workers, max_copies=copies, **kw)]


# --- placement: only what is missing ---------------------------------------------------------------------
def test_a_restarted_worker_gets_back_the_span_it_lost() -> None:
    """a keeps the first half (no room for more); b restarted empty: b gets exactly the second half."""
    a = _worker("a", 0, ("m", Span(0, 4, True, False)))
    assert _plan([a, _worker("b", 700)]) == [("b", Span(4, 8, False, True))]
    # The front restarted instead: the surviving tail is reused, the front loaded with the embeddings.
    tail = _worker("t", 0, ("m", Span(4, 8, False, True)))
    assert _plan([_worker("f", 700), tail]) == [("f", Span(0, 4, True, False))]


def test_a_lost_middle_span_is_loaded_alone_and_the_surviving_hops_kept() -> None:
    a = _worker("a", 0, ("m", Span(0, 3, True, False)))
    c = _worker("c", 0, ("m", Span(5, 8, False, True)))
    assert _plan([a, _worker("b", 300), c]) == [("b", Span(3, 5, False, False))]
    # No one worker has room for it: split over two.
    assert _plan([a, _worker("b", 130), _worker("d", 130), c]) == [
        ("b", Span(3, 4, False, False)), ("d", Span(4, 5, False, False))]


def test_spare_copies_are_rebuilt_on_workers_that_hold_none_of_the_span() -> None:
    """Two copies of each half were kept; the second tail died: a new tail goes to the empty worker (not to
    a worker that holds the surviving tail), and nothing else is planned."""
    front, tail = ("m", Span(0, 4, True, False)), ("m", Span(4, 8, False, True))
    workers = [_worker("a", 0, front), _worker("b", 0, tail), _worker("c", 0, front), _worker("d", 700)]
    assert _plan(workers, copies=2) == [("d", Span(4, 8, False, True))]
    assert _plan(workers, copies=1) == []  # one copy is enough: nothing to do
    # No room for the spare: nothing planned (a spare is only kept while capacity allows).
    assert _plan([*workers[:3], _worker("d", 100)], copies=2) == []


def test_orders_in_flight_count_as_held() -> None:
    a = _worker("a", 0, ("m", Span(0, 4, True, False)))
    pending = [placement.LoadOrder("b", "m", Span(4, 8, False, True))]
    assert _plan([a, _worker("b", 700)], pending=pending) == []
    # A spare copy is still planned around the one in flight (its memory counted as taken).
    assert _plan([a, _worker("b", 700), _worker("c", 1200)], copies=2, pending=pending) == [
        ("c", Span(0, 8, True, True))]


# --- the core keeps a placed model placed (real Redis, orders recorded, nothing sent) ---------------------
@pytest.fixture
def keep_model(r: redis.Redis, shard: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AZU_COPIES", "1")
    model_id = shard(f"tiny-keep-{uuid.uuid4().hex[:8]}")
    yield model_id
    for wid in ("k1", "k2"):
        directory.deregister(r, wid)
        r.delete(keys.assigned(wid))
    r.delete(keys.orders(model_id), keys.loading(model_id))
    r.hdel(keys.model(model_id), jobs.PLACED)


def _beat(r: redis.Redis, wid: str, free: int, *stages: tuple[str, Span], started_at: float) -> None:
    info = _worker(wid, free, *stages)
    info.started_at = started_at
    for m, span in stages:
        r.sadd(keys.assigned(wid), jobs.span_key(m, span))
    directory.register(r, info)


def test_a_refusal_for_failed_loads_retries_when_enough_back_offs_have_ended(monkeypatch) -> None:
    """A submit that only workers in a failed load's back-off could serve is refused until the earliest end
    after which the workers read could load the model: not the first back-off's end where that one worker
    is not enough, and naming only the workers whose back-off must end."""
    from types import SimpleNamespace

    monkeypatch.setenv("AZU_COPIES", "1")
    info: Any = SimpleNamespace(shape=SHAPE)  # 1100 bytes on one worker, 600 on each of two
    now = 1000.0
    a, b, c = _worker("a", 600), _worker("b", 600), _worker("c", 1200)
    # a and b are both needed: the later of their ends.
    err = jobs._no_capacity("m", info, [a, b], {"a": now + 10, "b": now + 50}, now)
    assert err.retry_after == 50 and "(a, b)" in err.message
    # c alone is enough once its back-off ends (30 s), before b's.
    err = jobs._no_capacity("m", info, [a, b, c], {"a": now + 10, "b": now + 50, "c": now + 30}, now)
    assert err.retry_after == 30 and "(a, c)" in err.message
    # A failed worker not read (lost since) sets nothing; without room enough, no Retry-After of its own.
    err = jobs._no_capacity("m", info, [a], {"a": now + 10, "z": now + 5}, now)
    assert err.retry_after is None and "cannot load it" in err.message


def test_jobs_of_a_model_being_loaded_wait_without_reading_the_whole_directory(r, keep_model,
                                                                              monkeypatch) -> None:
    """The first job of a model no route serves reads who could load it (placement's read: its holders and
    the roomiest others, test_units; in a network this small, every live worker) and places it; while those
    loads are in flight, the next jobs wait without reading that again or placing anything (each had read
    every live worker's record three times); the load's report starts them all."""
    model_id = keep_model
    front, tail = Span(0, 2, True, False), Span(2, 4, False, True)
    _beat(r, "k1", 0, (model_id, front), started_at=time.time())
    _beat(r, "k2", 10**15, started_at=time.time())  # room for the tail
    for wid in ("k1", "k2"):  # enrolled: a grant names each hop's key
        r.set(keys.identity(wid), auth.public_hex(SigningKey.generate()))
    reads, placed = noted_reads(monkeypatch), noted_places(monkeypatch)
    rec = Recording(None)

    def submit() -> str:
        job_id = f"load-{uuid.uuid4().hex[:8]}"
        jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=[1, 2],
                                           max_tokens=2), dispatch=rec)
        return job_id

    submitted: list[str] = []
    try:
        submitted.append(submit())
        assert (model_id, "roomiest", False) in reads and placed == [model_id]  # who could load it; placed
        assert all(m == model_id for m, _, _ in reads), reads  # placement's reads (two workers: all of them)
        assert rec.count(dispatch.LOAD) == 1  # k2: the tail
        assert r.exists(keys.loading(model_id))
        for _ in range(3):
            reads.clear(), placed.clear()
            submitted.append(submit())
            # The holders only, no placement.
            assert reads and all(m == model_id for m, _, _ in reads) and not placed, (reads, placed)
        assert rec.count(dispatch.LOAD) == 1
        assert {keys.as_str(j) for j in r.zrange(keys.waiting(model_id), 0, -1)} == set(submitted)
        # The tail is loaded (the collector's loaded report starts the waiting jobs).
        _beat(r, "k2", 10**15, (model_id, tail), started_at=time.time())
        assert jobs.start_waiting_jobs(r, model_id, dispatch=rec) == 4
        assert not r.zcard(keys.waiting(model_id)) and not r.exists(keys.loading(model_id))
        assert {jobs.get_job(r, j).status for j in submitted} == {"running"}
        assert r.llen(keys.pending("k1")) >= 1  # their first steps handed to k1
        # A loaded report with no job waiting still ends the loads in flight (else new jobs would wait).
        r.set(keys.loading(model_id), "[]")
        assert jobs.start_waiting_jobs(r, model_id, dispatch=rec) == 0
        assert not r.exists(keys.loading(model_id))
    finally:
        r.delete(keys.waiting(model_id), keys.pending("k1"), keys.pending("k2"), keys.wake("k1"),
                 keys.wake("k2"), keys.identity("k1"), keys.identity("k2"), *(keys.job(j) for j in submitted))
        if submitted:
            r.zrem(keys.ACTIVE_JOBS, *submitted)


def test_a_worker_that_restarted_empty_is_ordered_its_span_again(r, keep_model) -> None:
    model_id = keep_model
    front, tail = Span(0, 2, True, False), Span(2, 4, False, True)
    t0 = time.time() - 100
    _beat(r, "k1", 0, (model_id, front), started_at=t0)
    r.sadd(keys.assigned("k2"), jobs.span_key(model_id, tail))  # k2 held the tail before it restarted
    _beat(r, "k2", 10**15, started_at=time.time())  # ... and came back empty (most room of all live workers)
    rec = Recording(None)
    orders = jobs.place(r, model_id, spares=True, dispatch=rec)
    assert [(o.worker_id, o.span) for o in orders] == [("k2", tail)]
    assert rec.count(dispatch.LOAD) == 1 and rec.sent[0][1] == "ctl.k2"
    assert json.loads(r.get(keys.loading(model_id)))[0]["worker_id"] == "k2"  # new jobs wait, no 503
    # The order is in flight: the next check sends nothing.
    assert jobs.place(r, model_id, spares=True, dispatch=rec) == []
    # The worker restarted again before loading (the order may have died with it): ordered again.
    time.sleep(0.01)
    _beat(r, "k2", 10**15, started_at=time.time())
    assert [o.worker_id for o in jobs.place(r, model_id, spares=True, dispatch=rec)] == ["k2"]
    # The load failed (the collector takes the span off k2's assigned set): k2 is left out for a while,
    # so no order is sent to it again at once.
    r.srem(keys.assigned("k2"), jobs.span_key(model_id, tail))
    pending, failed = jobs.orders_in_flight(r, model_id, directory.live_workers(r))
    assert set(failed) == {"k2"} and not [o for o in pending if o.worker_id == "k2"]
    assert time.time() < failed["k2"] <= time.time() + jobs.FAILED_LOAD_BACKOFF_S  # its back-off's end
    assert all(o.worker_id != "k2" for o in jobs.place(r, model_id, spares=True, dispatch=rec))


def test_keep_placed_touches_only_models_the_core_placed(r, keep_model) -> None:
    model_id = keep_model
    _beat(r, "k1", 0, (model_id, Span(0, 2, True, False)), started_at=time.time())
    _beat(r, "k2", 10**15, started_at=time.time())
    rec = Recording(None)
    assert [o for o in jobs.keep_placed(r, dispatch=rec) if o.model_id == model_id] == []
    r.hset(keys.model(model_id), jobs.PLACED, "1")
    # Beaten again: the sweep above goes over every model the test session's Redis holds, and once in CI
    # (2026-12-04, a slow machine) the order for k2 did not come; a worker silent past the heartbeat TTL
    # would explain it (not established). Live now, k2 must get the order.
    _beat(r, "k1", 0, (model_id, Span(0, 2, True, False)), started_at=time.time())
    _beat(r, "k2", 10**15, started_at=time.time())
    assert [(o.worker_id, o.model_id) for o in jobs.keep_placed(r, dispatch=rec)
            if o.model_id == model_id] == [("k2", model_id)]


def test_keep_placed_reads_only_the_holders_of_a_model_placed_in_full(r, keep_model, monkeypatch) -> None:
    """The collector checks the placement every KEEP_EVERY_S on the thread that publishes tokens: a model
    whose holders make a route with every layer held AZU_COPIES times is passed over on its holders alone
    (not every live worker's record, nor its lock); one that lost a copy is placed as before."""
    model_id = keep_model
    front, tail = Span(0, 2, True, False), Span(2, 4, False, True)
    r.hset(keys.model(model_id), jobs.PLACED, "1")
    _beat(r, "k1", 0, (model_id, front), started_at=time.time())
    _beat(r, "k2", 0, (model_id, tail), started_at=time.time())
    crowd = [f"kc-{i:03d}" for i in range(200)]
    for wid in crowd:  # live workers with room, holding nothing
        directory.register(r, _worker(wid, 10**15))
    try:
        _keep_checks(r, model_id, front, tail, monkeypatch)
    finally:  # the suite's Redis is the session's: later tests must not find these workers live
        for wid in crowd:
            directory.deregister(r, wid)
            r.delete(keys.assigned(wid))
        r.delete(keys.orders(model_id))


def _keep_checks(r: redis.Redis, model_id: str, front: Span, tail: Span, monkeypatch: Any) -> None:
    placed, reads = noted_places(monkeypatch), noted_reads(monkeypatch)
    assert jobs._placed_enough(r, model_id, 1)
    assert [m for m, _, _ in reads] == [model_id]  # its holders (test_units: such a read GETs theirs only)
    assert not jobs._placed_enough(r, model_id, 2)  # a second copy is not there
    rec = Recording(None)
    reads.clear()
    assert [o for o in jobs.keep_placed(r, dispatch=rec) if o.model_id == model_id] == []
    assert model_id not in placed and model_id in [m for m, _, _ in reads]
    # k2 restarted empty: the tail is ordered again (to k2: the roomiest, as are the others, and first by id).
    # Ordered once, by this keep_placed or by the suite's cluster's core, whose collector keeps every placed
    # model of this Redis placed too (every 2 s; it may come first: then this one finds the order in flight).
    _beat(r, "k2", 10**15, started_at=time.time() + 1)
    orders = [o for o in jobs.keep_placed(r, dispatch=rec) if o.model_id == model_id]
    assert model_id in placed and [(o.worker_id, o.span) for o in orders] in ([("k2", tail)], [])
    assert [keys.as_str(f) for f in r.hkeys(keys.orders(model_id))] == [jobs._order_field("k2", tail)]


# --- a lost span with no spare copy: the job waits for a load, then carries on --------------------------
class LoadingNetwork(InlineNetwork):
    """InlineNetwork that also carries out load orders (from the local shard folder) and reports them."""

    def step(self) -> bool:
        if self.queue and self.queue[0][0] == dispatch.LOAD:
            _name, queue, _args, kwargs = self.queue.popleft()
            node = self.nodes.get(queue.partition(".")[2])
            if node is not None:
                span = Span.from_list(kwargs["span"])
                node.load_local(models.shard_dir(kwargs["model_id"]), model_id=kwargs["model_id"], span=span)
                node.report("loaded", {"model_id": kwargs["model_id"], "span": span.to_list()})
            self.collect()
            return True
        return super().step()


@pytest.fixture
def loading_net(r: redis.Redis, shard: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    monkeypatch.setenv("AZU_COPIES", "1")
    # A model of this test only: a core running meanwhile (the cluster's) keeps spare copies of a model that
    # lost a worker, on its own workers, where this test's in-process network could not run them.
    model_id = shard(f"tiny-reload-{uuid.uuid4().hex[:8]}")
    net = LoadingNetwork(r)
    folder = models.shard_dir(model_id)
    net.add("l1", folder, model_id, 0, 2, 4)
    net.add("l2", folder, model_id, 2, 4, 4)
    # An empty worker with the most room of any live worker: the lost span's load goes to it.
    spare = WorkerNode(r, worker_id="l3", dispatch=net, linger_s=0, reports_base=net.REPORTS,
                       memory_limit=10**15)
    r.set(keys.identity("l3"), spare.public_key)
    net.nodes["l3"] = spare
    spare.heartbeat()
    net.collect()
    yield net, model_id
    for wid in ("l1", "l2", "l3"):
        directory.deregister(r, wid)
        # A lost node's inbox (and its "awake" mark) must not outlive the test: senders would not wake it.
        r.delete(keys.assigned(wid), keys.pending(wid), keys.wake(wid))
    r.zrem(directory.LOST, "l1", "l2", "l3")
    r.delete(keys.orders(model_id))
    r.hdel(keys.model(model_id), jobs.PLACED)



@pytest.mark.parametrize("hop", [1, 0], ids=["lose-tail", "lose-front"])
def test_a_lost_span_with_no_spare_is_loaded_and_the_job_carries_on(r, loading_net, hop) -> None:
    net, model_id = loading_net
    params = {"temperature": 0.8, "top_k": 40, "seed": 99}
    clean = net.submit(model_id, prefix="jr", **params)
    net.run()
    expected = jobs.get_job(r, clean).token_ids
    assert len(expected) == 24
    job_id = net.submit(model_id, prefix="jr", **params)
    net.step_until(job_id, 5)
    route = jobs.job_route(jobs._hash(r, job_id))
    victim = route[hop].worker_id
    dead = net.nodes.pop(victim)  # lost mid-answer; no live worker holds its span
    directory.mark_lost(r, [victim])
    assert jobs.reroute_job(r, job_id, [victim], dispatch=net)
    job = jobs._hash(r, job_id)
    assert job["status"] == "queued" and job["resume"] == "1"  # waits for the load: a pause, not an error
    loads = [(q, k) for n, q, _a, k in net.queue if n == dispatch.LOAD]
    assert loads == [("ctl.l3", {"model_id": model_id, "span": route[hop].span.to_list(),
                                 "manifest_sha256": loads[0][1]["manifest_sha256"]})]
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.status == "done" and view.token_ids == expected
    final = jobs.job_route(jobs._hash(r, job_id))
    assert [h.span for h in final] == [h.span for h in route]
    assert final[hop].worker_id == "l3" and final[1 - hop] == route[1 - hop]  # the surviving hop kept
    # Charged once, as a run without the fault: the route that delivered the answer computed all of it.
    assert view.usage["workers"] == {h.worker_id: (4 + 24 - 1) * 2 for h in final}
    assert json.loads(jobs._hash(r, job_id)["reroutes"])[0]["lost"] == [victim]
    # Put the network back as it was for the next parameter: the victim's node returns, l3 is emptied.
    net.nodes[victim] = dead
    r.zrem(directory.LOST, victim)
    l3 = net.nodes["l3"]
    l3.stages.clear()
    l3.stage_bytes.clear()
    r.delete(keys.assigned("l3"))
    dead.heartbeat()
    l3.heartbeat()
    net.collect()


def test_a_lost_span_nobody_can_load_waits_then_fails_with_the_reason(r, loading_net) -> None:
    """No live worker can take the lost tail: the job waits up to the step deadline for a worker to come
    back (a supervisor restarting it), then fails with the reason."""
    net, model_id = loading_net
    job_id = net.submit(model_id, prefix="jr")
    net.step_until(job_id, 3)
    route = jobs.job_route(jobs._hash(r, job_id))
    victim = route[1].worker_id
    front = net.nodes[route[0].worker_id]
    front.memory_limit = sum(front.stage_bytes.values())  # the surviving front has no room for the tail
    front.heartbeat()
    net.collect()
    others = [w.worker_id for w in directory.live_workers(r) if w.worker_id != front.worker_id]
    directory.mark_lost(r, others)  # every other worker is gone too: nowhere to load the tail
    try:
        assert jobs.reroute_job(r, job_id, [victim], dispatch=net)
        assert jobs._hash(r, job_id)["status"] == "queued"  # waits: the lost worker may come back
        watchdog.recover_lost(r, dispatch=net)
        assert jobs._hash(r, job_id)["status"] == "queued"  # within the step deadline: still waiting
        deadline = get_settings().step_deadline_s
        r.hset(keys.job(job_id), "updated", str(time.time() - deadline - 1))
        watchdog.recover_lost(r, dispatch=net)
        view = jobs.get_job(r, job_id)
        assert view.status == "failed" and "can load" in (view.error or ""), view.error
        assert not r.zscore(keys.waiting(model_id), job_id)
    finally:
        r.zrem(directory.LOST, *others)
        front.memory_limit = None


def test_a_worker_restarted_within_the_step_timeout_is_lost_to_its_jobs(r, loading_net) -> None:
    """A supervisor brings a killed worker back within seconds: the new process heartbeats before the step
    timeout, but holds none of the job's caches. The core still moves the job (without marking the fresh
    process lost: it may load the span again)."""
    net, model_id = loading_net
    clean = net.submit(model_id, prefix="jr")
    net.run()
    expected = jobs.get_job(r, clean).token_ids
    job_id = net.submit(model_id, prefix="jr")
    net.step_until(job_id, 3)
    victim = jobs.job_route(jobs._hash(r, job_id))[1].worker_id
    old = net.nodes.pop(victim)
    # What was in flight to the old process died with it (the rest flows on: the fresh process refuses
    # the old epoch's steps it is handed, holding no cache for them).
    net.queue = collections.deque(m for m in net.queue if m[1].partition(".")[2] != victim)
    time.sleep(1.1)  # the directory keeps a process's start in whole seconds
    fresh = WorkerNode(r, worker_id=victim, dispatch=net, linger_s=0, reports_base=net.REPORTS, key=old.key)
    fresh.inbox.clear()
    net.nodes[victim] = fresh
    fresh.heartbeat()
    net.collect()
    now = time.time() + 30  # the job has been silent for 30 s, every worker heartbeats
    heartbeat(r, ("l1", "l2", "l3"), now)
    assert watchdog.recover_lost(r, now=now, timeout_s=2.0, dispatch=net) == [job_id]
    assert victim not in directory.lost_workers(r, now=now)
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.status == "done" and view.token_ids == expected
    assert victim not in {h.worker_id for h in jobs.job_route(jobs._hash(r, job_id))} or fresh.stages


def test_a_lost_mark_clears_for_any_new_process(r) -> None:
    """A supervisor may start the new process before the core finds the old one silent: its start is then
    older than the mark, but it is another process than the one marked, so the mark clears."""
    t0 = time.time()
    old = _worker("lm-1", 10)
    old.started_at = t0 - 100
    directory.register(r, old)
    directory.mark_lost(r, ["lm-1"], now=t0)
    directory.register(r, old)  # the old process's record again (a late heartbeat): still lost
    assert "lm-1" in directory.lost_workers(r)
    new = _worker("lm-1", 10)
    new.started_at = t0 - 5  # started before the mark
    directory.register(r, new)
    assert "lm-1" not in directory.lost_workers(r)
    assert "lm-1" in {w.worker_id for w in directory.live_workers(r)}
    directory.deregister(r, "lm-1")
