"""The pipeline end to end on real Celery worker processes over real Redis.

Greedy tokens must equal transformers' ``generate(do_sample=False)`` on the same weights, with 2 and 3
workers, with 8 jobs at once, after a duplicated step, and for a model no worker held when the job came.
The attacks of issue "Open network" (a worker minting, forging or writing facts) are in test_trust.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from azu.config import get_settings
from azu.engine.span import Span
from azu.network import directory, dispatch, jobs, keys
from azu.network.wire import StepPayload
from azu.registry import status as models
from tests.support import wait_for
from tests.support.network import Cluster, Recording, heartbeat

pytestmark = [pytest.mark.network, pytest.mark.slow]

NUM_LAYERS = 4
PROMPTS = [[1, 40, 50, 60, 70, 80], [1, 99, 12], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208],
           [1, 7], [1, 300, 250, 200, 150], [1, 65, 66, 67, 68], [1, 33, 44, 55], [1, 111, 222, 3, 4, 5, 6]]


def load_layout(cluster: Cluster, sender: Any, model_id: str, layout: dict[str, tuple[int, int]]) -> None:
    """Send load orders (as the scheduler does) and wait until the directory shows every holding."""
    spans = {wid: Span(first, last, first == 0, last == NUM_LAYERS) for wid, (first, last) in layout.items()}
    for wid, span in spans.items():
        jobs.order_load(cluster.r, wid, model_id, span, dispatch=sender)

    def held() -> bool:
        live = {w.worker_id: w for w in directory.live_workers(cluster.r)}
        return all(wid in live and span in live[wid].holds(model_id) for wid, span in spans.items())

    wait_for(held, timeout=90, what=f"{model_id} to be loaded as {layout}")


def collect(r: redis.Redis, job_id: str, *, timeout: float = 60.0) -> tuple[list[int], list[jobs.JobEvent]]:
    """Read the job's stream until its done/error event (deadline ``timeout``)."""
    last, tokens, events = "0-0", [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last, batch = jobs.read_events(r, job_id, last_id=last, block_ms=500)
        events += batch
        tokens += [e.token_id for e in batch if e.kind == "token"]
        if any(e.kind in ("done", "error") for e in batch):
            return tokens, events
    raise AssertionError(f"job {job_id} did not finish in {timeout}s; events so far: {events}")


def submit(r: redis.Redis, sender: Any, model_id: str, prompt: list[int], max_tokens: int,
           **kw: Any) -> str:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    jobs.submit_job(r, jobs.JobRequest(job_id=job_id, user_id="u1", model_id=model_id, prompt_ids=prompt,
                                       max_tokens=max_tokens, **kw), dispatch=sender)
    return job_id


def caches_freed(r: redis.Redis, *worker_ids: str) -> bool:
    live = {w.worker_id: w for w in directory.live_workers(r)}
    return all(live[w].cached_jobs == 0 for w in worker_ids)


@pytest.fixture(scope="module")
def two_workers(cluster: Cluster, celery_dispatch: Any, shard: Any) -> str:
    model_id = shard("tiny-two")
    load_layout(cluster, celery_dispatch, model_id, {"w1": (0, 2), "w2": (2, 4)})
    return model_id


def test_two_workers_match_generate(r, cluster, celery_dispatch, two_workers, reference) -> None:
    prompt, n = PROMPTS[0], 16
    job_id = submit(r, celery_dispatch, two_workers, prompt, n)
    tokens, events = collect(r, job_id)
    expected = reference(prompt, n)
    assert tokens == expected
    done = events[-1]
    assert done.kind == "done" and done.finish_reason == ("length" if len(expected) == n else "stop")
    # Token-layers: each stage ran the prompt and every fed-back token through its 2 layers.
    per_worker = (len(prompt) + n - 1) * 2
    assert done.usage == {"prompt_tokens": len(prompt), "completion_tokens": n,
                          "token_layers": 2 * per_worker, "workers": {"w1": per_worker, "w2": per_worker}}
    view = jobs.get_job(r, job_id)
    assert view is not None and view.status == "done" and view.token_ids == expected
    # The core worker settles the job; both stages free the job's KV cache.
    wait_for(lambda: r.hget(keys.job(job_id), "settled") == b"settled", what="settlement")
    wait_for(lambda: caches_freed(r, "w1", "w2"), what="KV caches to be freed")


def test_three_workers_match_generate(r, cluster, celery_dispatch, shard, reference) -> None:
    model_id = shard("tiny-three")
    load_layout(cluster, celery_dispatch, model_id, {"w1": (0, 1), "w2": (1, 3), "w3": (3, 4)})
    prompt, n = PROMPTS[2], 12
    job_id = submit(r, celery_dispatch, model_id, prompt, n)
    tokens, events = collect(r, job_id)
    assert tokens == reference(prompt, n)
    route = json.loads(r.hget(keys.job(job_id), "route"))
    assert [h[0] for h in route] == ["w1", "w2", "w3"]
    assert events[-1].usage["workers"] == {"w1": (len(prompt) + n - 1) * 1, "w2": (len(prompt) + n - 1) * 2,
                                           "w3": (len(prompt) + n - 1) * 1}


def test_a_long_prompt_goes_on_in_parts_through_three_worker_processes(r, cluster, celery_dispatch, shard,
                                                                        reference) -> None:
    """Workers whose lone prompt runs 32 positions at a time hand each chunk on as it runs: a 200-token prompt
    reaches the next stages in parts (their sessions wait for the next part as for a next step), the answer
    is transformers' greedy one, each worker is paid its layers' positions once, and the last worker's kept
    bundles (asked for with a core-signed evidence order) hold the prompt's parts."""
    from azu.network.wire import Report, unpack_inbox
    from azu.verification.orders import send_evidence_order

    parts = ("pp1", "pp2", "pp3")
    for wid in parts:
        cluster.start_gpu(wid, AZU_PREFILL_CHUNK="8")
    try:
        cluster.wait_live(*parts)
        model_id = shard("tiny-parts-live")
        load_layout(cluster, celery_dispatch, model_id, {"pp1": (0, 1), "pp2": (1, 3), "pp3": (3, 4)})
        prompt, n = [1, *range(100, 299)], 8
        job_id = submit(r, celery_dispatch, model_id, prompt, n)
        tokens, events = collect(r, job_id)
        assert tokens == reference(prompt, n)
        assert events[-1].usage["workers"] == {"pp1": (len(prompt) + n - 1) * 1,
                                               "pp2": (len(prompt) + n - 1) * 2,
                                               "pp3": (len(prompt) + n - 1) * 1}
        r.set(keys.evidence_asked(job_id, "pp3"), "1", ex=60)
        send_evidence_order("pp3", job_id=job_id, epoch=0, dispatch=celery_dispatch)
        wait_for(lambda: r.exists(keys.evidence(job_id, "pp3")), what="pp3's evidence")
        kept = Report.unpack(r.get(keys.evidence(job_id, "pp3"))).body["bundles"]
        firsts = [StepPayload.unpack(b) for blob in kept for b in unpack_inbox(blob).steps]
        starts = sorted(p.pos for p in firsts if p.step == 0)
        assert len(starts) >= 200 // 32 and starts[0] == 0, starts  # in parts of at most 32 positions
    finally:
        for wid in parts:
            cluster.stop(wid)
            directory.deregister(r, wid)


def handovers(port: int) -> dict[str, float]:
    """A worker process's hand-overs by path, from its /metrics."""
    import requests

    out = {"direct": 0.0, "redis": 0.0}
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith("azu_worker_handovers_total{"):
            out[line.split('path="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_hand_overs_go_worker_to_worker_directly_and_stay_exact(r, cluster, celery_dispatch, shard,
                                                                reference) -> None:
    """Three worker processes with P2P addresses: every hand-over between them goes over the direct path
    (none through Redis, by their own counters), a long prompt in parts and three jobs at once among them,
    and the answers are transformers' greedy ones."""
    from azu.cli.up import free_port

    ids = ("dp1", "dp2", "dp3")
    metrics = {wid: free_port() for wid in ids}
    p2p = {wid: f"tcp://127.0.0.1:{free_port()}" for wid in ids}
    for wid in ids:
        cluster.start_gpu(wid, AZU_PREFILL_CHUNK="8", P2P_PUBLIC_URL=p2p[wid],
                          AZU_METRICS_PORT=str(metrics[wid]))
    try:
        cluster.wait_live(*ids)
        model_id = shard("tiny-direct-live")
        load_layout(cluster, celery_dispatch, model_id, {"dp1": (0, 1), "dp2": (1, 3), "dp3": (3, 4)})
        prompts = [[1, *range(100, 160)], PROMPTS[0], PROMPTS[2]]
        jobs_sent = [(submit(r, celery_dispatch, model_id, p, 8), p) for p in prompts]
        for job_id, prompt in jobs_sent:
            tokens, _ = collect(r, job_id)
            assert tokens == reference(prompt, 8)
        counts = {wid: handovers(metrics[wid]) for wid in ids}
        assert all(c["direct"] > 0 and c["redis"] == 0 for c in counts.values()), counts
        assert "takes hand-overs directly" in cluster.log("dp2")
        direct_attacks(r, cluster, jobs_sent[0][0], victim="dp2", victim_url=p2p["dp2"],
                       before="dp1", metrics_port=metrics["dp2"])
    finally:
        for wid in ids:
            cluster.stop(wid)
            directory.deregister(r, wid)


def test_a_direct_path_cut_mid_answer_falls_back_to_redis_and_stays_exact(r, cluster, celery_dispatch, shard,
                                                                           reference) -> None:
    """Each worker's P2P address is a relay (20 ms each way); mid-answer both relays cut every connection and
    refuse new ones, as a broken link would look. The answer goes on through Redis (a frame lost in the cut
    is replayed after the step timeout) and is transformers' greedy one."""
    from tests.support.hosts import DelayRelay

    ids = ("dc1", "dc2")
    with contextlib.ExitStack() as held:
        # The ports stay bound until the relays have theirs: a relay's own port 0 could otherwise be one of
        # them (then a worker's metrics were the relay's, and a GET reached a P2P listener, which hung up).
        sockets = [held.enter_context(socket.socket()) for _ in range(2 * len(ids))]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = iter(sock.getsockname()[1] for sock in sockets)
        listen = {wid: next(ports) for wid in ids}
        metrics = {wid: next(ports) for wid in ids}
        relays = {wid: DelayRelay(listen_host="127.0.0.1", upstream=("127.0.0.1", listen[wid]), delay_s=0.02)
                  for wid in ids}
    for wid in ids:
        cluster.start_gpu(wid, P2P_PUBLIC_URL=f"tcp://127.0.0.1:{relays[wid].port}",
                          AZU_P2P_LISTEN=f"127.0.0.1:{listen[wid]}", AZU_METRICS_PORT=str(metrics[wid]))
    try:
        cluster.wait_live(*ids)
        model_id = shard("tiny-direct-cut")
        load_layout(cluster, celery_dispatch, model_id, {"dc1": (0, 2), "dc2": (2, 4)})
        prompt, n = PROMPTS[0], 40
        job_id = submit(r, celery_dispatch, model_id, prompt, n)
        wait_for(lambda: r.xlen(keys.events(job_id)) >= 5, what="five tokens", interval=0.005)
        before = {wid: handovers(metrics[wid]) for wid in ids}
        for relay in relays.values():
            relay.drop(refuse=True)
        tokens, events = collect(r, job_id)
        assert events[-1].kind == "done" and tokens == reference(prompt, n)
        after = {wid: handovers(metrics[wid]) for wid in ids}
        assert all(before[w]["direct"] > 0 for w in ids), before
        assert all(after[w]["redis"] > before[w]["redis"] for w in ids), after
    finally:
        for wid in ids:
            cluster.stop(wid)
            directory.deregister(r, wid)
            relays[wid].close()


def direct_attacks(r, cluster, job_id: str, *, victim: str, victim_url: str, before: str,
                   metrics_port: int) -> None:
    """Attacks on a worker's direct path with a worker's real credentials (an enrolled key): a bundle of the
    attacker's own for a real job whose route does not name it, and one claiming to come from the hop before.
    Each closes the connection at the listener; nothing reaches the victim's session (no refusal counted
    there, its hand-over counters unchanged)."""
    import torch

    from azu.network import auth, direct
    from azu.network.wire import StepBundle, pack_tensor

    key = auth.load_worker_key(cluster.enroll("evil"))
    raw = r.hgetall(keys.job(job_id))
    step = StepPayload(job_id=job_id, step=1, hop=1, pos=61, x=pack_tensor(torch.zeros(1, 64)),
                       grant=raw[b"grant"], grant_sig=raw[b"grant_sig"])
    refused_before = refused_payloads(metrics_port)
    counts_before = handovers(metrics_port)
    victim_key = r.get(keys.identity(victim)).decode()
    for sender in ("evil", before):  # its own name, then the hop before's
        unsigned = StepBundle(sender=sender, steps=(step.pack(),))
        blob = StepBundle(sender, unsigned.steps, auth.sign(key, auth.STEPS, unsigned.signed_part())).pack()
        conns = direct.Connections(key)
        assert conns.send(victim, victim_url, victim_key, blob)  # the hello passes: it proves nothing
        sock = conns._conns[victim].sock
        sock.settimeout(10)
        assert sock.recv(1) == b"", f"the listener kept a connection that sent {sender}'s forged bundle"
        conns.close()
    assert "that its grant does not name" in cluster.log(victim)
    assert refused_payloads(metrics_port) == refused_before  # the session never saw them
    assert handovers(metrics_port) == counts_before


def refused_payloads(port: int) -> float:
    import requests

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("azu_worker_refused_payloads_total{"))


def test_eight_concurrent_jobs_all_correct(r, cluster, celery_dispatch, two_workers, reference) -> None:
    n = 10
    ids = [submit(r, celery_dispatch, two_workers, p, n) for p in PROMPTS]
    for job_id, prompt in zip(ids, PROMPTS, strict=True):
        tokens, events = collect(r, job_id)
        assert tokens == reference(prompt, n), f"job for prompt {prompt}"
        completion = events[-1].usage["completion_tokens"]
        assert events[-1].usage["token_layers"] == 2 * 2 * (len(prompt) + completion - 1)
    wait_for(lambda: caches_freed(r, "w1", "w2"), what="KV caches to be freed")


def test_duplicated_step_does_not_advance_a_cache_twice(r, cluster, celery_dispatch, two_workers,
                                                        reference) -> None:
    """The first step's payload and its wake-up are delivered twice (as a redelivery would)."""
    prompt, n = PROMPTS[4], 8
    job_id = submit(r, celery_dispatch, two_workers, prompt, n)
    raw = r.hgetall(keys.job(job_id))
    payload = StepPayload(job_id=job_id, step=0, hop=0, pos=0, x=prompt, grant=raw[b"grant"],
                          grant_sig=raw[b"grant_sig"])
    # Again, twice: once now (possibly while the original is still pending) and once after it ran.
    jobs.send_steps(r, [payload], dispatch=celery_dispatch)
    wait_for(lambda: r.xlen(keys.events(job_id)) >= 1, what="the first token")
    jobs.send_steps(r, [payload], dispatch=celery_dispatch)
    dispatch.send_forward("w1", [b"dup"], dispatch=celery_dispatch)
    tokens, events = collect(r, job_id)
    assert tokens == reference(prompt, n)
    per_worker = (len(prompt) + n - 1) * 2
    assert events[-1].usage["workers"] == {"w1": per_worker, "w2": per_worker}  # nothing counted twice
    assert r.xlen(keys.events(job_id)) == n  # each step published once


def test_pickled_message_is_refused(r, cluster, celery_dispatch) -> None:
    import workers

    workers.app.send_task(dispatch.PING, args=["azu:ping:pickled", "1"], queue="ctl.w3",
                          serializer="pickle")
    # Same queue, sent after: once it has run, the pickled message before it was handled (refused).
    dispatch.send_ping("w3", "azu:ping:after-pickle", "1", dispatch=celery_dispatch)
    wait_for(lambda: r.get("azu:ping:after-pickle"), what="the msgpack ping")
    assert r.get("azu:ping:pickled") is None
    assert "pickle" in cluster.log("w3") and "Refusing to deserialize" in cluster.log("w3")


def test_model_no_worker_holds_gets_load_orders_then_is_served(r, cluster, celery_dispatch, shard,
                                                               reference) -> None:
    model_id = shard("tiny-jit")
    assert not any(w.holds(model_id) for w in directory.live_workers(r))
    rec = Recording(celery_dispatch)
    prompt, n = PROMPTS[5], 6
    ids = [submit(r, rec, model_id, prompt, n) for _ in range(2)]
    assert rec.count(dispatch.LOAD) >= 1  # ordered once, for the first job
    assert jobs.get_job(r, ids[0]).status in ("queued", "running", "done")
    for job_id in ids:
        tokens, _ = collect(r, job_id, timeout=90)
        assert tokens == reference(prompt, n)
    assert any(w.holds(model_id) for w in directory.live_workers(r))
    # Loaded now: the next job is routed at once, with no new load order.
    rec2 = Recording(celery_dispatch)
    job_id = submit(r, rec2, model_id, prompt, n)
    assert rec2.count(dispatch.LOAD) == 0
    assert collect(r, job_id)[0] == reference(prompt, n)


def test_tampered_file_fails_the_load_and_the_waiting_job(r, cluster, celery_dispatch, shard,
                                                          registry_http) -> None:
    model_id = shard("tiny-tampered")
    registry_http.tamper[(model_id, "layer_00001.safetensors")] = lambda b: b[:-1] + bytes([b[-1] ^ 1])
    registry_http.tamper[(model_id, "layer_00003.safetensors")] = lambda b: b[:-1] + bytes([b[-1] ^ 1])
    job_id = submit(r, celery_dispatch, model_id, PROMPTS[1], 4)
    _, events = collect(r, job_id, timeout=90)
    assert events[-1].kind == "error" and "SHA-256" in events[-1].error
    assert jobs.get_job(r, job_id).status == "failed"
    assert not any(w.holds(model_id) for w in directory.live_workers(r))


def test_request_shard_twice_shards_once(r, cluster, celery_dispatch, source_model, monkeypatch) -> None:
    monkeypatch.setenv("AZU_ALLOWED_MODEL_DIRS", str(source_model.parent))
    rec = Recording(celery_dispatch)
    a = models.request_shard(r, str(source_model), dispatch=rec)
    b = models.request_shard(r, str(source_model), dispatch=rec)
    assert a["model_id"] == b["model_id"] == source_model.name
    assert rec.count(dispatch.SHARD) == 1
    wait_for(lambda: models.model_status(r, source_model.name)["state"] in ("ready", "failed"), timeout=60,
             what="sharding by the registry worker")
    status = models.model_status(r, source_model.name)
    assert status["state"] == "ready" and status["progress"] == 1.0, status
    assert (models.shard_dir(source_model.name) / "manifest.json").is_file()
    assert source_model.name in models.ready_models(r)
    models.request_shard(r, str(source_model), dispatch=rec)
    assert rec.count(dispatch.SHARD) == 1  # ready: not sharded again


def test_dead_worker_gets_no_new_routes(r, cluster, celery_dispatch, shard) -> None:
    """w4 holds the only copy's second half and dies: once its heartbeat is
    stale, no route uses it."""
    model_id = shard("tiny-dead")
    cluster.start_gpu("w4", AZU_WALLET_ADDRESS="0xW4", P2P_PUBLIC_URL="http://w4.example:8003")
    cluster.wait_live("w4")
    w4 = directory.get_worker(r, "w4")
    assert (w4.queue, w4.device, w4.wallet, w4.p2p_url) == ("gpu.w4", "cpu", "0xW4", "http://w4.example:8003")
    assert 0 < w4.free_memory <= w4.total_memory
    load_layout(cluster, celery_dispatch, model_id, {"w3": (0, 2), "w4": (2, 4)})
    info = models.model_info(r, model_id)
    routes = jobs.placement.find_routes(model_id, info.num_layers, directory.live_workers(r))
    assert [[h.worker_id for h in route] for route in routes] == [["w3", "w4"]]
    cluster.kill("w4")  # SIGKILL: no goodbye, the heartbeats just stop
    heartbeat(r, ["w4"], time.time() - 2 * get_settings().heartbeat_ttl_s)  # as if long ago
    assert "w4" not in {w.worker_id for w in directory.live_workers(r)}
    rec = Recording(None)  # record what the job would send, send nothing
    job_id = submit(r, rec, model_id, PROMPTS[3], 3)
    assert rec.sent and all(queue != "gpu.w4" for _, queue, _ in rec.sent)
    # The missing half is ordered onto a live worker (w3's first half is reused).
    assert rec.count(dispatch.LOAD) >= 1
    orders = [(queue, Span.from_list(kw["span"])) for name, queue, kw in rec.sent if name == dispatch.LOAD]
    assert any(span.first == 2 and span.head and queue != "gpu.w4" for queue, span in orders), orders
    jobs.cancel_job(r, job_id, dispatch=rec)
    assert jobs.get_job(r, job_id).finish_reason == "cancelled"


def test_an_idle_worker_lingers_shows_in_flower_and_stops_at_once(r, cluster, celery_dispatch, shard,
                                                                   reference) -> None:
    """After a job a worker's session lingers on its inbox (AZU_LINGER_S): the next job finds it awake (the
    core sends no Celery message) and is exact; meanwhile Celery's heartbeat goes on (a solo worker's own
    stops while a task runs, and Flower would show it offline); a ping is answered at once; SIGTERM ends the
    session at once, not when the linger is over, and lets go of the wake key."""
    from workers import app

    model_id = shard("tiny-linger")
    cluster.start_gpu("w9", heartbeat=True, AZU_LINGER_S="60")
    cluster.wait_live("w9")
    load_layout(cluster, celery_dispatch, model_id, {"w9": (0, 4)})
    first = submit(r, celery_dispatch, model_id, PROMPTS[1], 4)
    assert collect(r, first)[0] == reference(PROMPTS[1], 4)
    assert r.exists(keys.wake("w9"))  # lingering
    beats: list[float] = []
    with app.connection_for_read() as conn:
        def on(event: dict[str, Any]) -> None:
            if event.get("hostname") == "w9@test" and event["type"] == "worker-heartbeat":
                beats.append(time.monotonic())

        receiver = app.events.Receiver(conn, handlers={"*": on})
        # capture ends on should_stop (events keep coming) or after 5.5 s without one (TimeoutError)
        threading.Timer(5.5, lambda: setattr(receiver, "should_stop", True)).start()
        with contextlib.suppress(TimeoutError):
            receiver.capture(limit=None, timeout=5.5, wakeup=False)
    assert len(beats) >= 2 and max(b - a for a, b in itertools.pairwise(beats)) < 3.5, beats
    rec = Recording(celery_dispatch)
    second = submit(r, rec, model_id, PROMPTS[2], 4)
    assert collect(r, second)[0] == reference(PROMPTS[2], 4)
    assert rec.count(dispatch.FORWARD) == 0  # found awake: no wake-up message
    assert r.exists(keys.wake("w9"))  # lingering again
    asked = time.monotonic()
    dispatch.send_ping("w9", "azu:ping:lingering", "1", dispatch=celery_dispatch)
    wait_for(lambda: r.get("azu:ping:lingering"), timeout=10, what="the lingering worker's pong")
    assert time.monotonic() - asked < 3.0  # a control message ends the linger within a slice
    third = submit(r, celery_dispatch, model_id, PROMPTS[3], 4)  # woken by Celery again
    assert collect(r, third)[0] == reference(PROMPTS[3], 4)
    started = time.monotonic()
    cluster.stop("w9")  # SIGTERM: Celery's warm shutdown waits for the session
    assert time.monotonic() - started < 5.0
    assert not r.exists(keys.wake("w9"))  # the session ended by its release, not by an error
