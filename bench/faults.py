"""Fault benchmark: kill a random stage of a running job at a random point, N times; count the answers
that completed, that were token-identical to ``generate`` (greedy), and that were charged once.

    python bench/faults.py [--trials 10] [--seed 1]

Its own redis-server on a free port, a static registry over HTTP, a core worker and four GPU-queue worker
processes (tests/support/network.py's Cluster) holding two copies of each half of a tiny Llama (4 layers).
Each trial: a job (greedy, up to 120 tokens) on a 2-hop route; after a random number of tokens (1-30) the
worker of a random hop gets SIGKILL; the core re-routes the job over the spare copy. The killed worker is
then restarted and ordered to load its span again (a new process: its lost mark clears at its first
heartbeat). "Charged once": the core-signed end record bills exactly the token-layers of a run without the
fault, and the job is settled once. Pause: the longest gap between two tokens the client saw.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _support import wait_until

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORKERS = {"b1": (0, 2), "b2": (0, 2), "b3": (2, 4), "b4": (2, 4)}
PROMPTS = [[1, 40, 50, 60, 70, 80], [1, 99, 12], [1, 200, 201, 202, 203, 204], [1, 300, 250, 200, 150]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="azu-faults-"))
    port = _free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(base)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    os.environ.update(AZU_TEST_NETWORK_REDIS_URL=url, REDIS_URL=url, AZU_REGISTRY_DIR=str(base / "registry"))
    from tests.support.network import SECRET

    os.environ["AUTH_SECRET_KEY"] = SECRET
    (base / "registry").mkdir()

    import redis
    import torch
    from transformers import AutoModelForCausalLM

    import workers
    from azu.cli.demo import build_model
    from azu.engine.span import Span
    from azu.network import directory, jobs, keys
    from azu.network.dispatch import get_dispatcher
    from azu.registry import status as models
    from azu.registry.sharder import shard_model
    from tests.support.network import Cluster, serve_registry

    r = redis.Redis.from_url(url)
    wait_until(lambda: _ping(r), 10, "redis-server")
    src = build_model("llama", base / "src", seed=7)
    model_id = "tiny-faults-bench"
    shard_model(str(src), models.shard_dir(model_id), progress=False)
    models.mark_ready(r, model_id, source=str(src))
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    server = serve_registry()
    cluster = Cluster(r, base, server.url)
    workers.use_broker(url)
    sender = get_dispatcher()

    def spans(wid: str) -> Span:
        first, last = WORKERS[wid]
        return Span(first, last, first == 0, last == 4)

    def load(wid: str) -> None:
        jobs.order_load(r, wid, model_id, spans(wid), dispatch=sender)

    def holds(wid: str) -> bool:
        live = {w.worker_id: w for w in directory.live_workers(r)}
        return wid in live and spans(wid) in live[wid].holds(model_id)

    def reference(prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        new = out[0, len(prompt):].tolist()
        eos = hf.config.eos_token_id
        return new[:new.index(eos)] if eos in new else new

    rows = []
    try:
        for wid in WORKERS:
            cluster.start_gpu(wid)
        cluster.start_core()
        cluster.wait_live(*WORKERS)
        cluster.wait_core()
        for wid in WORKERS:
            load(wid)
        wait_until(lambda: all(holds(w) for w in WORKERS), 120, "the loads")
        for trial in range(args.trials):
            prompt, n = PROMPTS[trial % len(PROMPTS)], 120
            expected = reference(prompt, n)
            kill_at = rng.randint(1, min(30, len(expected) - 1))
            hop = rng.randint(0, 1)
            job_id = f"bench-{uuid.uuid4().hex[:10]}"
            request = jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, prompt_ids=prompt,
                                      max_tokens=n)
            jobs.submit_job(r, request, dispatch=sender)
            victim = jobs.job_route(jobs._hash(r, job_id))[hop].worker_id
            last, tokens, times, end_kind, killed = "0-0", [], [], None, False
            deadline = time.monotonic() + 120
            while end_kind is None and time.monotonic() < deadline:
                last, batch = jobs.read_events(r, job_id, last_id=last, block_ms=200)
                for e in batch:
                    if e.kind == "token":
                        tokens.append(e.token_id)
                        times.append(time.monotonic())
                        if len(tokens) >= kill_at and not killed:
                            cluster.kill(victim)
                            killed = True
                    elif e.kind in ("done", "error"):
                        end_kind = e.kind
            job = jobs._hash(r, job_id)
            usage = json.loads(job.get("usage") or "{}")
            free_run = (len(prompt) + len(tokens) - 1) * 4
            charged_once = False
            if end_kind == "done":
                wait_until(lambda j=job_id: r.hget(keys.job(j), "settled") is not None, 30, "settlement")
                end = jobs.signed_end(jobs._hash_raw(r, job_id))
                charged_once = (end is not None and end["usage"]["token_layers"] == free_run
                                and usage == end["usage"] and victim not in usage["workers"])
            pause = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
            rows.append({"trial": trial, "hop": hop, "kill_at": kill_at, "killed": killed,
                         "complete": end_kind == "done", "identical": tokens == expected,
                         "charged_once": charged_once, "pause_s": round(pause, 3),
                         "epoch": int(job.get("epoch") or 0)})
            print(json.dumps(rows[-1]), flush=True)
            if killed:  # bring the victim back (a new process) with its span
                cluster.start_gpu(victim)
                cluster.wait_live(victim)
                load(victim)
                wait_until(lambda v=victim: holds(v), 120, f"{victim} to hold its span again")
    finally:
        cluster.stop_all()
        server.shutdown()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    killed_rows = [x for x in rows if x["killed"]]
    pauses = [x["pause_s"] for x in killed_rows]
    print(f"\n{len(rows)} trials, {len(killed_rows)} with a kill mid-answer: "
          f"{sum(x['complete'] for x in rows)} complete, {sum(x['identical'] for x in rows)} identical, "
          f"{sum(x['charged_once'] for x in rows)} charged once; pause p50 "
          f"{statistics.median(pauses) if pauses else 0:.2f}s, max {max(pauses, default=0):.2f}s "
          f"(core step timeout {4 * 0.5:.0f}s = 4 heartbeats of 0.5s)")
    ok = all(x["complete"] and x["identical"] and x["charged_once"] for x in rows)
    return 0 if ok else 1


def _ping(r) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(r.ping())
    except Exception:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
