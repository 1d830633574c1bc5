"""Many users at once through the API: streamed chat completions sent together to `azu up`, its API process
run with 16 threads (the default before the fortieth session) and with the default now.

    python bench/api_streams.py [--streams 1,16,64,128] [--tokens 32] [--threads 16,128]

For each thread count, one `azu up --workers 2 --threads N` (its demo model and its ledger: every request is
authenticated and its hold placed on PostgreSQL), with ``AZU_RATE_LIMIT_JOBS=off`` (the bench's streams share
one API key, whose limit is 120 jobs a minute). For each number of streams K, K streamed chat completions are
sent at once (a thread each) and each one's times are taken from when it was sent: accepted (its first SSE
chunk, which the API sends once the job is held and submitted), its first token, its end. Also the API
process's CPU seconds for the K. Each row is one burst (the machine has 2 cores, shared by the API, the
workers, the core and the databases: the rows are noisy, the gaps between thread counts are not).

An answer in flight holds one of the API's threads until it ends (azu.cli.processes.API_THREADS): with 16,
the 17th request of a burst waits in the socket's queue until an earlier answer is over.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fault_table import Up


def stream(up: Up, i: int, tokens: int) -> dict[str, Any]:
    """One streamed chat completion: its HTTP status, times (s from sending) and completion tokens."""
    import requests

    body = {"model": up.info["model"], "messages": [{"role": "user", "content": f"Tell story {i}"}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    resp = requests.post(up.info["base_url"] + "/v1/chat/completions", json=body, stream=True, timeout=600,
                         headers={"Authorization": f"Bearer {up.info['api_key']}"})
    out: dict[str, Any] = {"status": resp.status_code, "accepted": None, "first": None, "tokens": 0}
    for line in resp.iter_lines(chunk_size=None):  # each chunk as it comes (iter_lines buffers 512 bytes)
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.monotonic() - t0
        if out["accepted"] is None:
            out["accepted"] = now  # the first chunk (the assistant's role), sent right after the submit
        elif out["first"] is None and any((c.get("delta") or {}).get("content")
                                          for c in chunk.get("choices") or []):
            out["first"] = now
        if chunk.get("usage"):
            out["tokens"] = int(chunk["usage"]["completion_tokens"])
    out["end"] = time.monotonic() - t0
    return out


def api_cpu_s(up: Up) -> float:
    """CPU seconds of the API's processes so far (gunicorn's arbiter and its worker)."""
    import psutil

    total = 0.0
    for p in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            if "gunicorn" in " ".join(p.cmdline()) and f":{up.port}" in " ".join(p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def burst(up: Up, k: int, tokens: int) -> dict[str, Any]:
    before = api_cpu_s(up)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        got = list(pool.map(lambda i: stream(up, i, tokens), range(k)))
    wall = time.monotonic() - t0
    ok = [g for g in got if g["status"] == 200 and g["first"] is not None]

    def med(key: str) -> float:
        return statistics.median(g[key] for g in ok) if ok else float("nan")

    return {"k": k, "ok": len(ok), "refused": len(got) - len(ok), "accepted": med("accepted"),
            "accepted_max": max((g["accepted"] for g in ok), default=float("nan")), "first": med("first"),
            "first_max": max((g["first"] for g in ok), default=float("nan")), "end": med("end"),
            "tok_s": sum(g["tokens"] for g in ok) / wall, "cpu_ms": 1000 * (api_cpu_s(up) - before) / k}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,16,64,128", help="streams sent at once, one burst each")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of each answer")
    p.add_argument("--threads", default="16,128", help="the API process's threads, one `azu up` each")
    args = p.parse_args()
    counts = [int(k) for k in args.streams.split(",")]
    os.environ["AZU_RATE_LIMIT_JOBS"] = "off"
    results: dict[int, list[dict[str, Any]]] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        folder = Path(tempfile.mkdtemp(prefix="azu-bench-api-"))
        up = Up(folder, "--threads", str(threads))
        try:
            stream(up, 0, 4)  # the workers awake, the model placed and loaded
            results[threads] = []
            for k in counts:
                row = burst(up, k, args.tokens)
                results[threads].append(row)
                print(f"[bench] {threads} threads, {k} streams: {json.dumps(row)}", flush=True)
        finally:
            up.stop()
            shutil.rmtree(folder, ignore_errors=True)

    first_threads = min(results)
    print(f"\nStreamed chat completions sent at once through `azu up --workers 2` (demo model, ledger on, "
          f"max_tokens {args.tokens}; times from sending, medians (max); one burst a row)\n")
    print("| streams | API threads | accepted s | first token s | end s | completion tokens/s | "
          f"API CPU ms a request | refused | first token vs {first_threads} threads |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for i, k in enumerate(counts):
        base = results[first_threads][i]["first"]
        for threads, rows in results.items():
            r = rows[i]
            print(f"| {k} | {threads} | {r['accepted']:.2f} ({r['accepted_max']:.2f}) | {r['first']:.2f} "
                  f"({r['first_max']:.2f}) | {r['end']:.2f} | {r['tok_s']:.0f} | {r['cpu_ms']:.0f} | "
                  f"{r['refused']} | {r['first'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
