"""What a job's first token waits for on the core before any worker runs: ``submit_job``'s round trips and
time, and the directory read it starts with, against the live directory's size.

    python bench/submit.py [--sizes 2,10,100,1000] [--jobs 400] [--pause 0.3] [--redis-db 13]

A private Redis database (flushed before and after) holds two models cut in two and ``--sizes`` live workers,
each an enrolled identity, a directory record and the spans the core ordered it: every worker holds half of
the first model (half the first span, half the second); two of them also hold the second model. The workers
are records only: submit does not wait for them, and the Celery messages it would send to idle workers are
counted, not sent. Rows:

- ``submit_job`` of the first model (all hold it) with the model's record already read (as the API does for
  the hold): median time and round trips, back to back and after ``--pause`` idle (a first token usually
  follows a pause); back to back it alternates with submits that read every holder
  (``directory.SUBMIT_PER_SPAN`` = 0), as every submit did before it read a window of each span's holders;
  then again with 20,000 entries of silent workers in the model's indexes (an index keeps a worker that
  stopped heartbeating for an hour); and of a model being loaded (placed, its orders in flight, nobody
  holding it yet), alternating with submits that do not look for the loads in flight (before: every live
  worker's record read three times, placement checked);
- ``submit_job`` of the second model, which 2 of the live workers hold: what a crowd of workers that do not
  hold a model (or that enrolled only to heartbeat) costs its jobs;
- the collector's placement check of the second model (``jobs.keep_placed``, every 2 s on the thread that
  publishes the tokens), which finds it placed in full: on its holders, against ``place`` reading the
  whole directory, as every check did before the model index; and of the first model, on the windows a
  submit reads (now) against every holder (before); and the collector's re-route of a job whose last hop
  was lost (``jobs.reroute_job``, once for each of the lost worker's jobs, on the same thread): windows of
  each span's holders and the job's old route (now), against every holder (before) (with 2 workers the lost
  hop's span has no other holder: both order it loaded and the job waits);
- placement: the first job of a model nobody holds (submit reads who could load it, plans, orders and
  records the loads, and the job waits), and the collector's re-route of a job whose lost last hop had the
  only copy of its span (the second model's: the load planned and ordered, the job waiting for it), with
  placement reading the model's holders and ``directory.PLACE_ROOMIEST`` roomiest others (now) against
  every live worker (before);
- the collector's work for one heartbeat of every worker (signed reports, as their nodes send them): in
  batches as it pops them, against each heartbeat's own round trips (as before);
- the second model's directory read (``directory.snapshot(model_id=...)``: one Lua script over the model's
  holders) against the whole directory's (every live worker's record: what submit read before the model
  index); how long Redis itself ran the first model's read, windows and every holder (``INFO
  commandstats``), which holds every other client meanwhile.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = 24
MODELS = ("bench-submit", "bench-few")  # every worker holds half of the first; two of them the second
LOADING = "bench-loading"  # nobody holds it: the core's loads of it are in flight
SIGNERS: dict[str, Any] = {}  # worker id -> its signing key (its heartbeats are signed)


class Counted:
    """A dispatcher that counts the Celery messages submit would send, and sends none."""

    def __init__(self) -> None:
        self.sent = 0

    def send_task(self, name: str, *, queue: str, args: Any = (), kwargs: Any = None) -> None:
        self.sent += 1


def add_workers(r: Any, first: int, last: int) -> None:
    from nacl.signing import SigningKey

    from azu.network import auth, directory, jobs, keys

    for i in range(first, last):  # the workers' names: sub-00000 ...
        wid = f"sub-{i:05d}"
        span = span_of(i)
        held = MODELS if i < 2 else MODELS[:1]
        directory.register(r, directory.WorkerInfo(
            worker_id=wid, queue=f"gpu.{wid}", device="cpu", total_memory=10**10, free_memory=10**9,
            stages=[(m, span) for m in held]))
        r.sadd(keys.assigned(wid), *(jobs.span_key(m, span) for m in held))
        SIGNERS[wid] = SigningKey.generate()
        r.set(keys.identity(wid), auth.public_hex(SIGNERS[wid]))


def heartbeats(names: list[str]) -> list[bytes]:
    """A signed heartbeat report of each worker, as its node sends one every AZU_HEARTBEAT_S."""
    from azu.network import reports

    out = []
    for i, wid in enumerate(names):
        span = span_of(i)
        body = {"device": "cpu", "total_memory": 10**10, "free_memory": 10**9, "cached_jobs": 0,
                "stages": [[m, *span.to_list()] for m in (MODELS if i < 2 else MODELS[:1])],
                "started_at": 1, "p2p_url": f"tcp://10.0.{i // 250}.{i % 250}:8003"}
        out.append(reports.sign(SIGNERS[wid], wid, "heartbeat", body))
    return out


def heartbeat_round(r: Any, names: list[str]) -> tuple[float, float]:
    """Seconds the collector takes for one heartbeat of every worker: in batches as it pops them, and each
    on its own (its own round trips, as every heartbeat made before a batch's were written together)."""
    from azu.network.collector import BATCH_MAX, Collector

    collector = Collector(r)
    blobs = heartbeats(names)
    collector.process(blobs[:BATCH_MAX])  # the identities read once, as in a running collector
    collector.process(blobs[BATCH_MAX:])
    t = time.perf_counter()
    for at in range(0, len(blobs), BATCH_MAX):
        assert collector.process(blobs[at:at + BATCH_MAX]) == len(blobs[at:at + BATCH_MAX])
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for blob in blobs:  # each heartbeat's round trips of its own, as before: its assigned set, its lost mark,
        collector._heartbeat(collector.verify(blob))  # its writes
        collector._write_heartbeats()
    collector.tally.flush(r)
    return batched, time.perf_counter() - t


def submit_once(r: Any, info: Any, names: list[str], dispatch: Counted, *,
                job_id: str | None = None) -> tuple[float, int]:
    """One submit of a 3-token prompt: (seconds, round trips it made)."""
    import redis.connection

    from azu.network import jobs, keys

    # All heard from now (adding a thousand, or a slow submit, takes a while): none expires meanwhile. What
    # each heartbeat writes: the directory's time, and that of each model index the worker is in.
    now = time.time()
    r.zadd(keys.WORKERS, dict.fromkeys(names, now))
    for model_id, holding in ((MODELS[0], names), (MODELS[1], names[:2])):
        r.zadd(keys.holders(model_id), dict.fromkeys(holding, now))
        for name, members in by_span(holding).items():
            r.zadd(keys.span_holders(model_id, name), dict.fromkeys(members, now))
            r.zadd(keys.held_spans(model_id), {name: now})
    req = jobs.JobRequest(job_id=job_id or f"sub-{uuid.uuid4().hex[:12]}", user_id="u",
                          model_id=info.model_id, prompt_ids=[1, 2, 3], max_tokens=4)
    sent = 0
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        nonlocal sent
        sent += 1
        return real(self, *a, **k)

    redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    t = time.perf_counter()
    try:
        jobs.submit_job(r, req, dispatch=dispatch, info=info)  # type: ignore[arg-type]
    finally:
        took = time.perf_counter() - t
        redis.connection.AbstractConnection.send_packed_command = real  # type: ignore[method-assign]
    return took, sent


def reroute_once(r: Any, info: Any, names: list[str], dispatch: Counted, per_span: int) -> float:
    """Seconds the collector's re-route of a job just started (``jobs.reroute_job``) takes when its last
    hop's worker is lost, reading ``per_span`` holders of each span (0: every holder)."""
    from azu.network import directory, jobs

    job_id = f"sub-{uuid.uuid4().hex[:12]}"
    submit_once(r, info, names, dispatch, job_id=job_id)
    lost = jobs.job_route(jobs._hash(r, job_id))[-1].worker_id
    t = time.perf_counter()
    assert reading(directory, per_span, lambda: jobs.reroute_job(r, job_id, [lost], dispatch=dispatch))
    return time.perf_counter() - t


def first_job_once(r: Any, info: Any, names: list[str], dispatch: Counted) -> float:
    """Seconds the first job of a model nobody holds takes to submit (its placement read, the loads planned
    and recorded, the job put on the waiting list); then the model is as before it (nothing ordered)."""
    took, _trips = submit_once(r, info, names, dispatch)
    unplace(r, info.model_id)
    return took


def reroute_no_spare_once(r: Any, info: Any, names: list[str], dispatch: Counted) -> float:
    """Seconds the collector's re-route (``jobs.reroute_job``) of a job of ``info``'s model takes when its
    last hop's worker is lost and no other worker holds that span: the load planned and ordered, the job
    put back to wait for it; then all as before (the worker not lost, nothing ordered)."""
    from azu.network import directory, jobs

    job_id = f"sub-{uuid.uuid4().hex[:12]}"
    submit_once(r, info, names, dispatch, job_id=job_id)
    lost = jobs.job_route(jobs._hash(r, job_id))[-1].worker_id
    directory.mark_lost(r, [lost])
    t = time.perf_counter()
    try:
        assert jobs.reroute_job(r, job_id, [lost], dispatch=dispatch)
        return time.perf_counter() - t
    finally:
        r.zrem(directory.LOST, lost)
        unplace(r, info.model_id)


def unplace(r: Any, model_id: str) -> None:
    """Forget the loads ordered for ``model_id`` and the jobs waiting for it (as if never placed)."""
    from azu.engine.span import Span
    from azu.network import jobs, keys

    for raw in r.hkeys(keys.orders(model_id)):
        worker_id, *span = json.loads(raw)
        r.srem(keys.assigned(worker_id), jobs.span_key(model_id, Span.from_list(span)))
    r.delete(keys.orders(model_id), keys.loading(model_id), keys.waiting(model_id))
    r.hdel(keys.model(model_id), jobs.PLACED)


def placing(directory: Any, roomiest: int, run: Any) -> Any:
    """``run()`` with placement reading the holders and ``roomiest`` roomiest others (0: every live worker,
    as before ``directory.PLACE_ROOMIEST``)."""
    return patched(directory, "PLACE_ROOMIEST", roomiest, run)


def reading(directory: Any, per_span: int, submit: Any) -> Any:
    """``submit()`` with submits reading ``per_span`` holders of each span of a model (0: every holder)."""
    return patched(directory, "SUBMIT_PER_SPAN", per_span, submit)


def patched(module: Any, name: str, value: Any, run: Any) -> Any:
    """``run()`` with ``module.name`` set to ``value``, as it was afterwards."""
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        return run()
    finally:
        setattr(module, name, kept)


def loads_unseen(jobs: Any, submit: Any) -> Any:
    """``submit()`` as before submit looked for the core's loads in flight: every live worker read for its
    route, placement asked, every live worker read for the waiting jobs; whether the workers could load the
    model not asked (it was not while loads were in flight). Its ``EXISTS`` of the loads (a round trip) is
    not made: a hair faster than it was."""
    kept = jobs.loading_in_flight, jobs._could_load, jobs.orders_in_flight
    jobs.loading_in_flight, jobs._could_load = (lambda r, model_id: False), (lambda info, workers: True)
    look = kept[2]  # nor the failed loads (the submit's read-only look, since the fortieth session)
    jobs.orders_in_flight = lambda r, m, w, *, now=None, record=True: (
        look(r, m, w, now=now) if record else ([], {}))
    try:
        return submit()
    finally:
        jobs.loading_in_flight, jobs._could_load, jobs.orders_in_flight = kept


def span_of(i: int) -> Any:
    """The span the ``i``-th worker holds of each model it holds: even ones the first half, odd the second."""
    from azu.engine.span import Span

    half = LAYERS // 2
    return Span(0, half, True, False) if i % 2 == 0 else Span(half, LAYERS, False, True)


def by_span(names: list[str]) -> dict[str, list[str]]:
    """Each span's name (as the indexes name it) -> the workers of ``names`` holding it (``span_of``)."""
    from azu.network import directory

    return {directory.span_name(span_of(k)): names[k::2] for k in (0, 1)}


def silent(r: Any, model_id: str, count: int, at: float) -> list[str]:
    """``count`` entries of workers last heard from ``at`` in the model's indexes, half in each span's."""
    from azu.network import keys

    gone = [f"gone-{i:05d}" for i in range(count)]
    r.zadd(keys.holders(model_id), dict.fromkeys(gone, at))
    for name, members in by_span(gone).items():
        r.zadd(keys.span_holders(model_id, name), dict.fromkeys(members, at))
    return gone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,10,100,1000", help="live workers in the directory, rising")
    p.add_argument("--jobs", type=int, default=400,
                   help="submits back to back per size (a tenth as many after pauses)")
    p.add_argument("--pause", type=float, default=0.3, help="idle seconds before each paused submit")
    p.add_argument("--redis-db", type=int, default=13)
    args = p.parse_args()
    import logging

    import redis

    logging.getLogger("azu.network.jobs").setLevel(logging.ERROR)  # each re-route's line, hundreds of them

    from azu.config import get_settings
    from azu.network import directory, jobs, keys
    from azu.registry.status import ModelInfo

    sizes = [int(n) for n in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 2:
        p.error("--sizes: rising, at least 2")
    r = redis.Redis(db=args.redis_db)
    r.flushdb()
    infos = tuple(ModelInfo(
        model_id=model_id, architecture="LlamaForCausalLM", num_layers=LAYERS, hidden_size=896,
        vocab_size=32000, torch_dtype="float32", eos_token_ids=(2,), context_length=4096,
        layer_bytes=(10**7,) * LAYERS, embeddings_bytes=10**8, head_bytes=10**8)
        for model_id in (*MODELS, LOADING))
    every, few, being_loaded = infos
    for info in infos:  # ready, as the registry marks a sharded model (placement reads it)
        r.hset(keys.model(info.model_id), mapping={"state": "ready", "info": info.to_json()})
    rows, checks, beats, placements = [], [], [], []
    dispatch = Counted()
    try:
        have = 0
        for n in sizes:
            add_workers(r, have, n)
            have = n
            names = [f"sub-{i:05d}" for i in range(n)]
            submit = functools.partial(submit_once, r, every, names, dispatch)
            jobs_n = max(20, args.jobs * 2 // n) if n > 10 else args.jobs
            warm, every_holder = [], []
            # Alternating: windows of each span's holders (now), every holder (before).
            for _ in range(jobs_n):
                warm.append(submit())
                every_holder.append(reading(directory, 0, submit))
            gone = silent(r, every.model_id, 20_000, time.time() - 100)
            among_silent, every_among_silent = [], []
            for _ in range(jobs_n):
                among_silent.append(submit())
                every_among_silent.append(reading(directory, 0, submit))
            r.zrem(keys.holders(every.model_id), *gone)
            for name, members in by_span(gone).items():
                r.zrem(keys.span_holders(every.model_id, name), *members)
            # The first job of a model nobody holds, and a re-route whose lost span had no other holder:
            # placement over the holders and the roomiest others (now), over every live worker (before).
            first_now, first_before, lone_now, lone_before = [], [], [], []
            first = functools.partial(first_job_once, r, being_loaded, names, dispatch)
            lone = functools.partial(reroute_no_spare_once, r, few, names, dispatch)
            for _ in range(max(5, jobs_n // 4)):
                first_now.append(first())
                first_before.append(placing(directory, 0, first))
                lone_now.append(lone())
                lone_before.append(placing(directory, 0, lone))
            placements.append((n, *(statistics.median(x) for x in (first_now, first_before, lone_now,
                                                                    lone_before))))
            # A model being loaded: placed once (its orders recorded, none sent), then jobs wait for it, now
            # and as before (as if no load were in flight: every live worker read, placement checked).
            assert jobs.place(r, LOADING, spares=False, dispatch=dispatch)
            waiting, waiting_before = [], []
            wait = functools.partial(submit_once, r, being_loaded, names, dispatch)
            for _ in range(max(10, jobs_n // 4)):
                waiting.append(wait())
                waiting_before.append(loads_unseen(jobs, wait))
            r.delete(keys.waiting(LOADING), keys.loading(LOADING), keys.orders(LOADING))
            paused = []
            for _ in range(max(5, jobs_n // 10)):
                time.sleep(args.pause)
                paused.append(submit())
            held_by_two = [submit_once(r, few, names, dispatch) for _ in range(jobs_n)]
            holders, whole = [], []
            for _ in range(jobs_n):
                for out, read in ((holders, lambda: directory.snapshot(r, model_id=few.model_id)),
                                  (whole, lambda: directory.snapshot(r))):
                    t = time.perf_counter()
                    read()
                    out.append(time.perf_counter() - t)
            # The collector's placement check of the 2-holder model, placed in full (one copy wanted).
            quick, full = [], []
            for _ in range(max(5, jobs_n // 4)):
                t = time.perf_counter()
                assert jobs._placed_enough(r, few.model_id, 1)  # what keep_placed asks first now
                quick.append(time.perf_counter() - t)
                t = time.perf_counter()
                assert placing(directory, 0, lambda: jobs.place(  # before
                    r, few.model_id, spares=True, copies=1, dispatch=dispatch)) == []
                full.append(time.perf_counter() - t)
            # And of the model all of them hold: windows of each span's holders (now), every holder (before).
            windows: list[float] = []
            every_read: list[float] = []
            for _ in range(max(5, jobs_n // 4)):
                for out, per_span in ((windows, directory.SUBMIT_PER_SPAN), (every_read, 0)):
                    t = time.perf_counter()
                    assert reading(directory, per_span, lambda: jobs._placed_enough(r, every.model_id, 1))
                    out.append(time.perf_counter() - t)
            # The re-route of a running job whose last hop was lost: windows of each span's holders and the
            # job's old route (now), every holder (before).
            rerouted: list[float] = []
            rerouted_before: list[float] = []
            for _ in range(max(5, jobs_n // 4)):
                rerouted.append(reroute_once(r, every, names, dispatch, directory.SUBMIT_PER_SPAN))
                rerouted_before.append(reroute_once(r, every, names, dispatch, 0))
            checks.append((n, statistics.median(quick), statistics.median(full), statistics.median(windows),
                           statistics.median(every_read), statistics.median(rerouted),
                           statistics.median(rerouted_before)))
            beats.append((n, *min(heartbeat_round(r, names) for _ in range(3))))
            in_redis = []
            for per_span in (directory.SUBMIT_PER_SPAN, 0):
                r.config_resetstat()
                for _ in range(10):
                    directory.snapshot(r, model_id=every.model_id, per_span=per_span)
                in_redis.append(r.info("commandstats").get("cmdstat_eval", {}).get("usec_per_call", 0.0))
            rows.append((n, statistics.median(t for t, _ in warm),
                         statistics.median(t for t, _ in every_holder),
                         statistics.median(t for t, _ in among_silent),
                         statistics.median(t for t, _ in every_among_silent),
                         statistics.median(t for t, _ in waiting),
                         statistics.median(t for t, _ in waiting_before),
                         statistics.median(c for _, c in warm),
                         statistics.median(t for t, _ in paused),
                         statistics.median(t for t, _ in held_by_two), statistics.median(holders),
                         statistics.median(whole), *in_redis))
            print(f"[bench] {n} live workers done", file=sys.stderr, flush=True)
            r.delete(*r.keys("azu:pending:*") or ["-"], *r.keys("azu:job:*") or ["-"])
    finally:
        r.flushdb()
    print(f"submit_job with the model read (Redis db {args.redis_db}; workers are directory records; "
          f"{dispatch.sent} Celery wake-ups counted, none sent)\n")
    print(f"| live workers | submit, all hold the model: {directory.SUBMIT_PER_SPAN} holders of each span "
          "read (now) | every holder read (before) | now / before | the same among 20,000 silent workers' "
          "entries, now / before | a model being loaded (nobody holds it yet), now / before | round trips | "
          "submit after "
          f"{args.pause:g} s idle | submit, 2 of them hold the model | its directory read: the model's "
          "holders | the whole directory | holders / whole | Redis running the read (all hold): windows / "
          "every holder |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (n, warm_s, every_s, silent_s, every_silent_s, waiting_s, waiting_before_s, trips, paused_s, few_s,
         holders_s, whole_s, windows_us, every_us) in rows:
        print(f"| {n} | {warm_s * 1000:.2f} ms | {every_s * 1000:.2f} ms | {warm_s / every_s:.2f}x | "
              f"{silent_s * 1000:.2f} / {every_silent_s * 1000:.2f} ms | "
              f"{waiting_s * 1000:.2f} / {waiting_before_s * 1000:.2f} ms | {trips:g} | "
              f"{paused_s * 1000:.2f} ms | {few_s * 1000:.2f} ms | {holders_s * 1000:.2f} ms | "
              f"{whole_s * 1000:.2f} ms | {holders_s / whole_s:.2f}x | {windows_us / 1000:.2f} / "
              f"{every_us / 1000:.2f} ms |")
    print("\nThe collector's placement check (keep_placed, every 2 s on the thread that publishes tokens) of "
          "the model 2 workers hold, and of the model all of them hold, placed in full; and its re-route of "
          "a job whose last hop was lost (on the same thread, once for each job the lost worker had):\n")
    print("| live workers | 2 hold it: its holders only | `place`, reading the whole directory | holders / "
          "whole | all hold it: windows of each span's holders (now) | every holder (before) | now / "
          "before | re-route: windows and the old route (now) | every holder (before) | now / before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, quick_s, full_s, windows_s, every_read_s, reroute_s, reroute_before_s in checks:
        print(f"| {n} | {quick_s * 1000:.2f} ms | {full_s * 1000:.2f} ms | {quick_s / full_s:.2f}x | "
              f"{windows_s * 1000:.2f} ms | {every_read_s * 1000:.2f} ms | {windows_s / every_read_s:.2f}x | "
              f"{reroute_s * 1000:.2f} ms | {reroute_before_s * 1000:.2f} ms | "
              f"{reroute_s / reroute_before_s:.2f}x |")
    print("\nPlacement: the first job of a model nobody holds (submit: who could load it read, the loads "
          "planned, ordered and recorded), and the collector's re-route of a job whose lost last hop had the "
          "only copy of its span (the load planned and ordered, the job waiting for it; once for each job "
          "the lost worker had, on the thread that publishes tokens): placement reading the model's holders "
          f"and the {directory.PLACE_ROOMIEST} roomiest others (now), every live worker (before):\n")
    print("| live workers | first job: now | before | now / before | re-route, no spare: now | before | "
          "now / before |")
    print("|---|---|---|---|---|---|---|")
    for n, first_s, first_before_s, lone_s, lone_before_s in placements:
        print(f"| {n} | {first_s * 1000:.2f} ms | {first_before_s * 1000:.2f} ms | "
              f"{first_s / first_before_s:.2f}x | {lone_s * 1000:.2f} ms | {lone_before_s * 1000:.2f} ms | "
              f"{lone_s / lone_before_s:.2f}x |")
    every = get_settings().worker.heartbeat_s
    print(f"\nThe collector's heartbeats: one of every worker (each sends one every {every:g} s), on the "
          "thread that publishes tokens (best of 3):\n")
    print("| live workers | in batches, as popped (now) | each on its own (before) | now / before | "
          "the thread's time taken, now / before |")
    print("|---|---|---|---|---|")
    for n, batched_s, alone_s in beats:
        print(f"| {n} | {batched_s * 1000:.2f} ms ({batched_s / n * 1e6:.0f} us each) | "
              f"{alone_s * 1000:.2f} ms ({alone_s / n * 1e6:.0f} us each) | {batched_s / alone_s:.2f}x | "
              f"{batched_s / every:.1%} / {alone_s / every:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
