"""What a job's first token waits for on the core before any worker runs: ``submit_job``'s round trips and
time, and the directory read it starts with, against the live directory's size.

    python bench/submit.py [--sizes 2,10,100,1000] [--jobs 400] [--pause 0.3] [--redis-db 13]

A private Redis database (flushed before and after) holds a model cut in two and ``--sizes`` live workers,
each an enrolled identity, a directory record and the span the core ordered it (half hold the first span,
half the second). The workers are records only: submit does not wait for them, and the Celery messages it
would send to idle workers are counted, not sent. Rows:

- ``submit_job`` with the model's record already read (as the API does for the hold): median time and round
  trips, back to back and after ``--pause`` idle (a first token usually follows a pause);
- the directory read (``directory.snapshot``: one Lua script) against the two pipelined reads it replaced
  (kept here as the baseline; they also read the identities, which the grant then read again): median time,
  their ratio, and how long Redis itself ran the script (``INFO commandstats``), which holds every other
  client meanwhile.
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


def two_pipelined_reads(r: Any, now: float) -> Any:
    """The directory read as it was before the thirty-third session: two pipelined round trips."""
    from azu.network import directory, keys

    pipe = r.pipeline(transaction=False)
    pipe.zrangebyscore(keys.WORKERS, now - directory._ttl(None), "+inf")
    pipe.zrangebyscore(directory.LOST, now - directory.LOST_HOLD_S, "+inf")
    pipe.hkeys(keys.BANNED)
    found, lost_ids, banned = pipe.execute()
    lost = {keys.as_str(w) for w in (*lost_ids, *banned)}
    ids = [i for i in (keys.as_str(i) for i in found) if i not in lost]
    pipe = r.pipeline(transaction=False)
    pipe.mget([keys.worker(i) for i in ids])
    pipe.mget([keys.identity(i) for i in ids])
    for i in ids:
        pipe.smembers(keys.assigned(i))
    raws, identities, *ordered = pipe.execute()
    out = []
    for raw, spans in zip(raws, ordered, strict=True):
        info = directory.WorkerInfo.from_json(raw)
        allowed = {keys.as_str(s) for s in spans}
        info.stages = [(m, span) for m, span in info.stages if json.dumps([m, *span.to_list()]) in allowed]
        out.append(info)
    return out, identities


class Counted:
    """A dispatcher that counts the Celery messages submit would send, and sends none."""

    def __init__(self) -> None:
        self.sent = 0

    def send_task(self, name: str, *, queue: str, args: Any = (), kwargs: Any = None) -> None:
        self.sent += 1


def add_workers(r: Any, model_id: str, first: int, last: int) -> None:
    from nacl.signing import SigningKey

    from azu.engine.span import Span
    from azu.network import auth, directory, jobs, keys

    half = LAYERS // 2
    for i in range(first, last):  # the workers' names: sub-00000 ...
        wid = f"sub-{i:05d}"
        span = Span(0, half, True, False) if i % 2 == 0 else Span(half, LAYERS, False, True)
        directory.register(r, directory.WorkerInfo(
            worker_id=wid, queue=f"gpu.{wid}", device="cpu", total_memory=10**10, free_memory=10**9,
            stages=[(model_id, span)]))
        r.sadd(keys.assigned(wid), jobs.span_key(model_id, span))
        r.set(keys.identity(wid), auth.public_hex(SigningKey.generate()))


def submit_once(r: Any, info: Any, names: list[str], dispatch: Counted) -> tuple[float, int]:
    """One submit of a 3-token prompt: (seconds, round trips it made)."""
    import redis.connection

    from azu.network import jobs, keys

    # All heard from now (adding a thousand, or a slow submit, takes a while): none expires meanwhile.
    r.zadd(keys.WORKERS, dict.fromkeys(names, time.time()))
    req = jobs.JobRequest(job_id=f"sub-{uuid.uuid4().hex[:12]}", user_id="u", model_id=info.model_id,
                          prompt_ids=[1, 2, 3], max_tokens=4)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,10,100,1000", help="live workers in the directory, rising")
    p.add_argument("--jobs", type=int, default=400,
                   help="submits back to back per size (a tenth as many after pauses)")
    p.add_argument("--pause", type=float, default=0.3, help="idle seconds before each paused submit")
    p.add_argument("--redis-db", type=int, default=13)
    args = p.parse_args()
    import redis

    from azu.network import directory
    from azu.registry.status import ModelInfo

    sizes = [int(n) for n in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 2:
        p.error("--sizes: rising, at least 2")
    r = redis.Redis(db=args.redis_db)
    r.flushdb()
    model_id = "bench-submit"
    info = ModelInfo(model_id=model_id, architecture="LlamaForCausalLM", num_layers=LAYERS, hidden_size=896,
                     vocab_size=32000, torch_dtype="float32", eos_token_ids=(2,), context_length=4096,
                     layer_bytes=(10**7,) * LAYERS, embeddings_bytes=10**8, head_bytes=10**8)
    rows = []
    dispatch = Counted()
    try:
        have = 0
        for n in sizes:
            add_workers(r, model_id, have, n)
            have = n
            submit = functools.partial(submit_once, r, info, [f"sub-{i:05d}" for i in range(n)], dispatch)
            jobs_n = max(20, args.jobs * 2 // n) if n > 10 else args.jobs
            warm = [submit() for _ in range(jobs_n)]
            paused = []
            for _ in range(max(5, jobs_n // 10)):
                time.sleep(args.pause)
                paused.append(submit())
            script, pipelined = [], []
            for _ in range(jobs_n):
                for out, read in ((script, lambda: directory.snapshot(r)),
                                  (pipelined, lambda: two_pipelined_reads(r, time.time()))):
                    t = time.perf_counter()
                    read()
                    out.append(time.perf_counter() - t)
            r.config_resetstat()
            for _ in range(10):
                directory.snapshot(r)
            in_redis = r.info("commandstats").get("cmdstat_eval", {}).get("usec_per_call", 0.0)
            rows.append((n, statistics.median(t for t, _ in warm), statistics.median(c for _, c in warm),
                         statistics.median(t for t, _ in paused), statistics.median(script),
                         statistics.median(pipelined), in_redis))
            print(f"[bench] {n} live workers done", file=sys.stderr, flush=True)
            r.delete(*r.keys("azu:pending:*") or ["-"], *r.keys("azu:job:*") or ["-"])
    finally:
        r.flushdb()
    print(f"submit_job with the model read (Redis db {args.redis_db}; workers are directory records; "
          f"{dispatch.sent} Celery wake-ups counted, none sent)\n")
    print("| live workers | submit, back to back | round trips | submit after "
          f"{args.pause:g} s idle | directory read: one script | two pipelined reads (before) | "
          "script / pipelined | Redis running the script |")
    print("|---|---|---|---|---|---|---|---|")
    for n, warm_s, trips, paused_s, script_s, piped_s, in_redis in rows:
        print(f"| {n} | {warm_s * 1000:.2f} ms | {trips:g} | {paused_s * 1000:.2f} ms | "
              f"{script_s * 1000:.2f} ms | {piped_s * 1000:.2f} ms | {script_s / piped_s:.2f}x | "
              f"{in_redis / 1000:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
