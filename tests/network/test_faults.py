"""A worker lost mid-answer: the job carries on (issue "Survive faults").

Real Redis, real Celery worker processes: four workers hold two copies of each half of the tiny model. A job
runs on one 2-hop route; the worker of one hop is SIGKILLed after a few tokens. The core notices within the
step timeout (4 heartbeats, 2 s here), marks the worker lost, re-routes the job over the spare copy with a new
grant epoch and replays its prefix: the stream goes on after a pause, with exactly the tokens of a run
without the fault, and the user is charged as for a run without the fault. Then the lost copies are rebuilt,
and a job whose lost span has no spare waits while the span is loaded on a worker with room.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from azu.engine.span import Span
from azu.network import auth, directory, jobs, keys, placement, watchdog
from azu.network.wire import StepPayload, end_order_part
from azu.registry import status as models
from tests.network.test_pipeline import PROMPTS, load_layout, submit
from tests.support import wait_for
from tests.support.network import Cluster, InlineNetwork, heartbeat

pytestmark = [pytest.mark.network]

# --- in process first (fast; before the cluster below runs a core whose collector would see these jobs):
# seeded sampling, epochs, the lost decision
INLINE = ("j1", "j2", "j3")


@pytest.fixture(scope="module")
def inline3(r: redis.Redis, shard: Any) -> Iterator[tuple[InlineNetwork, str]]:
    model_id = shard("tiny-faults-inline")
    net = InlineNetwork(r)
    folder = models.shard_dir(model_id)
    net.add("j1", folder, model_id, 0, 2, 4)
    net.add("j2", folder, model_id, 2, 4, 4)
    net.add("j3", folder, model_id, 2, 4, 4)
    yield net, model_id
    for wid in INLINE:
        directory.deregister(r, wid)
    r.zrem(directory.LOST, *INLINE)
    # A job a test left mid-route (its workers gone) must not be found in flight by a later module's
    # watchdog (the Redis database lives for the whole session).
    mine = [j for j in r.zrange(keys.ACTIVE_JOBS, 0, -1) if j.startswith(b"jf-")]
    if mine:
        r.zrem(keys.ACTIVE_JOBS, *mine)



def test_seeded_sampling_is_identical_across_a_reroute(r, inline3) -> None:
    """A sampled (temperature, top-k, seed) job re-routed after 5 tokens gives the fault-free run's tokens;
    old-epoch steps and end orders do not touch the new epoch's caches."""
    net, model_id = inline3
    params = {"temperature": 0.9, "top_k": 50, "seed": 1234}
    clean = net.submit(model_id, prefix="jf", **params)
    net.run()
    expected = jobs.get_job(r, clean).token_ids
    assert len(expected) == 24
    job_id = net.submit(model_id, prefix="jf", **params)
    raw = r.hgetall(keys.job(job_id))
    old_grant, old_sig = raw[b"grant"], raw[b"grant_sig"]
    net.step_until(job_id, 5)
    route = jobs.job_route(jobs._hash(r, job_id))
    victim = route[1].worker_id
    dead = net.nodes.pop(victim)  # its messages now go nowhere: lost mid-answer
    directory.mark_lost(r, [victim])
    step = int(r.hget(keys.job(job_id), "step") or 0)
    assert jobs.reroute_job(r, job_id, [victim], dispatch=net)
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.status == "done" and view.token_ids == expected
    final = jobs.job_route(jobs._hash(r, job_id))
    assert victim not in {h.worker_id for h in final} and final[0] == route[0]
    assert view.usage["workers"] == {h.worker_id: (4 + 24 - 1) * 2 for h in final}
    # A late step of the old epoch (say, from the lost worker) is dropped: no cache is revived or advanced.
    j1 = net.nodes["j1"]
    stage = j1.stages[(model_id, Span(0, 2, True, False))]
    late = StepPayload(job_id=job_id, step=step, hop=0, pos=4 + step - 1, x=[expected[step - 1]],
                       grant=old_grant, grant_sig=old_sig)
    j1._process(jobs.bundles([late], sender=victim, key=dead.key).values())  # type: ignore[arg-type]
    assert stage.job_length(job_id) == 0
    net.nodes[victim] = dead


def test_old_epoch_end_order_keeps_the_new_epochs_cache(r, inline3) -> None:
    net, model_id = inline3
    job_id = net.submit(model_id, prefix="jf")
    net.step_until(job_id, 3)
    route = jobs.job_route(jobs._hash(r, job_id))
    r.zrem(directory.LOST, *INLINE)
    assert jobs.reroute_job(r, job_id, [route[1].worker_id], dispatch=net)
    j1 = net.nodes["j1"]
    stage = j1.stages[(model_id, Span(0, 2, True, False))]
    while getattr(j1.jobs.get(job_id), "epoch", 0) != 1:  # j1 runs the replay (prompt + 3 tokens), epoch 1
        assert net.step()
    assert stage.job_length(job_id) == 4 + 3
    j1.end_job(job_id=job_id, epoch=0, sig=auth.sign(auth.core_signing_key(), auth.END_ORDER,
                                                     end_order_part(job_id, 0)))
    assert stage.job_length(job_id) == 4 + 3  # the order was for the route the job left
    net.run()
    assert jobs.get_job(r, job_id).status == "done"
    r.zrem(directory.LOST, *INLINE)


def test_lost_only_when_the_job_and_a_worker_are_both_silent(r, inline3) -> None:
    net, model_id = inline3
    r.zrem(directory.LOST, *INLINE)
    job_id = net.submit(model_id, prefix="jf")
    net.step()
    now = time.time() + 5  # the job has been silent for 5 s ...
    route = jobs.job_route(jobs._hash(r, job_id))
    heartbeat(r, INLINE, now)  # ... but every worker heartbeats: a slow job, left alone
    net.queue.clear()
    assert watchdog.recover_lost(r, now=now, timeout_s=2.0, dispatch=net) == []
    # Silent for 3 step timeouts with every worker there: the step was lost (not a worker): the same route
    # replays the job under a new epoch, and no worker is marked lost.
    now += 30
    heartbeat(r, INLINE, now)
    assert watchdog.recover_lost(r, now=now, timeout_s=2.0, dispatch=net) == [job_id]
    job = jobs._hash(r, job_id)
    assert job["epoch"] == "1" and jobs.job_route(job) == route
    assert json.loads(job["reroutes"])[-1]["lost"] == []
    assert not directory.lost_workers(r, now=now) & set(INLINE)
    net.queue.clear()
    now += 10
    heartbeat(r, INLINE, now)
    heartbeat(r, [route[1].worker_id], now - 10)  # now one of them has gone quiet too
    assert watchdog.recover_lost(r, now=now, timeout_s=2.0, dispatch=net) == [job_id]
    assert directory.lost_workers(r, now=now) & set(INLINE) == {route[1].worker_id}
    assert route[1].worker_id not in {w.worker_id for w in directory.live_workers(r, now=now)}
    assert jobs._hash(r, job_id)["epoch"] == "2"
    jobs.cancel_job(r, job_id, dispatch=net)
    net.run()
    r.zrem(directory.LOST, *INLINE)
    heartbeat(r, INLINE, time.time())


def replayed_after_silence(r: redis.Redis, net: InlineNetwork, job_id: str, expected: list[int]) -> None:
    """Nothing comes of ``job_id`` for 3.5 step timeouts while every worker heartbeats: the watchdog replays
    it on its route, and it ends with ``expected``."""
    now = time.time() + 7
    heartbeat(r, INLINE, now)
    assert watchdog.recover_lost(r, now=now, timeout_s=2.0, dispatch=net) == [job_id]
    net.run()
    view = jobs.get_job(r, job_id)
    assert view.status == "done" and view.token_ids == expected
    heartbeat(r, INLINE, time.time())


def test_a_lost_step_is_replayed_on_the_same_route(r, inline3) -> None:
    """Every worker heartbeats but the step in flight is gone (a Redis restart lost the last second of
    hand-overs): after 3 step timeouts the job is replayed on its route, and ends as a run without the
    fault."""
    net, model_id = inline3
    r.zrem(directory.LOST, *INLINE)
    for w in INLINE:  # the tests above dropped messages: no worker may look awake with nothing to wake it
        r.delete(keys.pending(w), keys.wake(w))
    clean = net.submit(model_id, prefix="jf")
    net.run()
    expected = jobs.get_job(r, clean).token_ids
    job_id = net.submit(model_id, prefix="jf")
    net.step_until(job_id, 4)
    net.queue.clear()  # the step in flight is lost ...
    for w in INLINE:
        r.delete(keys.pending(w), keys.wake(w))
    replayed_after_silence(r, net, job_id, expected)  # ... and nothing comes for 3.5 step timeouts


def test_a_prompt_part_lost_on_the_way_is_replayed_not_failed(r, inline3, monkeypatch) -> None:
    """A long prompt goes to the next hop in parts; one part is lost (a failed hand-over) while the later
    ones arrive. The next hop drops the later parts (they leave a gap) instead of failing the job; the job
    stalls like one whose step was lost, the watchdog replays it on its route, and it ends as a run without
    the fault."""
    net, model_id = inline3
    r.zrem(directory.LOST, *INLINE)
    for w in INLINE:
        r.delete(keys.pending(w), keys.wake(w))
    for node in net.nodes.values():
        monkeypatch.setattr(node, "prefill_chunk", 2)  # the lone prompt runs (and goes on) 8 positions a time
    prompt = [1, *range(40, 70)]
    clean = net.submit(model_id, prefix="jf", prompt_ids=prompt, max_tokens=6)
    net.run()
    expected = jobs.get_job(r, clean).token_ids
    assert len(expected) == 6
    job_id = net.submit(model_id, prefix="jf", prompt_ids=prompt, max_tokens=6)
    _, queue, args, _ = net.queue.popleft()  # the first hop's wake-up with the prompt
    assert queue == "gpu.j1"
    net.nodes["j1"].process_pending(args[0] if args else None)  # runs the prompt, handing on 4 parts
    nxt = jobs.job_route(jobs._hash(r, job_id))[1].worker_id
    parts = r.lrange(keys.pending(nxt), 0, -1)  # (the first may ride in the wake-up message instead)
    assert len(parts) >= 2
    r.lrem(keys.pending(nxt), 1, parts[0])  # a part is lost on the way; one after it arrives
    net.run()
    assert jobs.get_job(r, job_id).status == "running"  # stalled, not failed
    replayed_after_silence(r, net, job_id, expected)


# --- real worker processes: SIGKILL mid-answer
SPARES = ("f1", "f2", "f3", "f4")
MAX_TOKENS = 200  # long enough that the kill lands mid-answer


@pytest.fixture(scope="module")
def spares(r: redis.Redis, cluster: Cluster, celery_dispatch: Any, shard: Any) -> Iterator[str]:
    """Workers of this module only (they get killed): two copies of layers [0, 2) and of [2, 4)."""
    for wid in SPARES:
        cluster.start_gpu(wid)
    try:
        cluster.wait_live(*SPARES)
        model_id = shard("tiny-faults")
        load_layout(cluster, celery_dispatch, model_id,
                    {"f1": (0, 2), "f2": (0, 2), "f3": (2, 4), "f4": (2, 4)})
        yield model_id
    finally:
        for wid in SPARES:
            cluster.stop(wid)
            directory.deregister(r, wid)  # later tests must not plan loads on them
        r.zrem(directory.LOST, *SPARES)


def follow(r: redis.Redis, job_id: str, *, on_token: Any = None,
           timeout: float = 90.0) -> tuple[list[int], list[jobs.JobEvent], list[float]]:
    """The job's events until done/error, with the arrival time of each token."""
    last, tokens, events, times = "0-0", [], [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last, batch = jobs.read_events(r, job_id, last_id=last, block_ms=200)
        for e in batch:
            events.append(e)
            if e.kind == "token":
                tokens.append(e.token_id)
                times.append(time.monotonic())
                if on_token is not None:
                    on_token(len(tokens))
        if any(e.kind in ("done", "error") for e in batch):
            return tokens, events, times
    raise AssertionError(f"job {job_id} did not finish in {timeout}s; events so far: {events[-3:]}")


@pytest.mark.slow
@pytest.mark.parametrize("hop", [1, 0], ids=["kill-last-hop", "kill-first-hop"])
def test_worker_killed_mid_answer_the_job_carries_on(r, cluster, celery_dispatch, spares, reference,
                                                     hop) -> None:
    model_id, prompt = spares, PROMPTS[0]
    expected = reference(prompt, MAX_TOKENS)
    assert len(expected) > 20, "the reference answer must be long enough to kill mid-answer"
    job_id = submit(r, celery_dispatch, model_id, prompt, MAX_TOKENS)
    route = jobs.job_route(jobs._hash(r, job_id))
    victim = route[hop].worker_id
    assert victim in SPARES
    killed_at: list[int] = []

    def kill_after_a_few(n: int) -> None:
        if n >= 3 and not killed_at:
            cluster.kill(victim)  # SIGKILL mid-answer: no goodbye
            killed_at.append(n)

    tokens, events, times = follow(r, job_id, on_token=kill_after_a_few)
    assert killed_at and killed_at[0] < len(expected), "the kill did not land mid-answer"
    # The user saw a pause, not an error: the same tokens as transformers' generate, then done.
    assert [e.kind for e in events if e.kind != "token"] == ["done"], events[-2:]
    assert tokens == expected
    pause = max(b - a for a, b in itertools.pairwise(times))
    assert pause < 10.0, f"pause {pause:.1f}s"
    job = jobs._hash(r, job_id)
    reroutes = json.loads(job["reroutes"])
    assert [x["lost"] for x in reroutes] == [[victim]] and job["epoch"] == "1"
    final = jobs.job_route(job)
    assert victim not in {h.worker_id for h in final}
    assert [h.span for h in final] == [h.span for h in route]
    assert final[1 - hop] == route[1 - hop]  # the surviving hop was kept
    # Charged once, as a run without the fault: the route that delivered the answer is paid for all of it.
    done = events[-1]
    n, per_hop = len(tokens), (len(prompt) + len(tokens) - 1) * 2
    assert done.usage == {"prompt_tokens": len(prompt), "completion_tokens": n, "token_layers": 2 * per_hop,
                          "workers": {h.worker_id: per_hop for h in final}}
    end = jobs.signed_end(jobs._hash_raw(r, job_id))
    assert end is not None and end["usage"] == done.usage
    wait_for(lambda: r.hget(keys.job(job_id), "settled") == b"settled", what="settlement")
    # The killed worker gets no new route at once (its last heartbeat is still within the TTL).
    assert victim in directory.lost_workers(r) and not directory.is_live(r, victim)
    info = models.model_info(r, model_id)
    routes = placement.find_routes(model_id, info.num_layers, directory.live_workers(r))
    assert routes and all(victim not in {h.worker_id for h in rt} for rt in routes)
    print(f"\nkilled {victim} (hop {hop}) after {killed_at[0]} tokens; pause {pause:.2f}s "
          f"(core step timeout 2 s); {n} tokens identical")


def _copies(r: redis.Redis, model_id: str) -> int:
    """How many live workers hold the least-held layer of ``model_id``."""
    n = models.model_info(r, model_id).num_layers
    live = directory.live_workers(r)
    return min(sum(1 for w in live for s in w.holds(model_id) if s.first <= i < s.last) for i in range(n))


@pytest.mark.slow
def test_lost_copies_are_rebuilt(r, cluster, celery_dispatch, spares) -> None:
    """The kills above left one copy of each half: the core loads the second copies again on live workers
    with room (AZU_COPIES, 2 by default), without a request asking for it."""
    wait_for(lambda: _copies(r, spares) >= 2, timeout=90, what="the lost copies to be rebuilt")


@pytest.mark.slow
def test_a_lost_span_with_no_spare_is_loaded_and_the_job_carries_on(r, cluster, celery_dispatch, spares,
                                                                   shard, reference) -> None:
    """A model with one copy only (on the two spares left): its tail's worker is SIGKILLed mid-answer. No
    live worker holds the tail, so the core orders it loaded on a live worker with room; the job waits (a
    pause) and carries on with the prefix replayed: the tokens of a run without the fault, charged once."""
    live = sorted({w.worker_id for w in directory.live_workers(r)} & set(SPARES))
    assert len(live) >= 2, live
    for extra in live[2:]:  # how many spares the earlier tests left running varies: keep exactly two
        cluster.stop(extra)
        directory.deregister(r, extra)
    live = live[:2]
    model_id = shard("tiny-faults-reload")
    load_layout(cluster, celery_dispatch, model_id, {live[0]: (0, 2), live[1]: (2, 4)})
    prompt = PROMPTS[0]
    expected = reference(prompt, MAX_TOKENS)
    job_id = submit(r, celery_dispatch, model_id, prompt, MAX_TOKENS)
    route = jobs.job_route(jobs._hash(r, job_id))
    victim = route[1].worker_id
    fired: list[int] = []

    def kill(n: int) -> None:
        if n >= 3 and not fired:
            cluster.kill(victim)
            fired.append(n)

    tokens, events, times = follow(r, job_id, on_token=kill, timeout=180)
    assert fired and [e.kind for e in events if e.kind != "token"] == ["done"], events[-2:]
    assert tokens == expected
    pause = max(b - a for a, b in itertools.pairwise(times))
    job = jobs._hash(r, job_id)
    final = jobs.job_route(job)
    assert final[0] == route[0] and final[1].span == route[1].span and final[1].worker_id != victim
    assert final[1].worker_id not in {w for w in SPARES if w != route[0].worker_id}  # a worker that loaded it
    assert [x["lost"] for x in json.loads(job["reroutes"])] == [[victim]] and job["epoch"] == "1"
    per_hop = (len(prompt) + len(tokens) - 1) * 2
    expected_usage: dict[str, int] = {}
    for h in final:  # the worker that loaded the tail may hold the front too: it is paid for both
        expected_usage[h.worker_id] = expected_usage.get(h.worker_id, 0) + per_hop
    assert events[-1].usage["workers"] == expected_usage
    wait_for(lambda: r.hget(keys.job(job_id), "settled") == b"settled", what="settlement")
    print(f"\nkilled {victim} after {fired[0]} tokens; tail loaded on {final[1].worker_id}; "
          f"pause {pause:.2f}s; {len(tokens)} tokens identical")
