"""Time to first token after an idle pause: a job that finds its workers still waiting on their inboxes
(``AZU_LINGER_S``) against one that has to wake them with Celery messages.

    python bench/ttft_idle.py [--linger 3] [--jobs 24] [--margin 0.5]

Two worker processes (Petals' model and cut, as in bench/pipeline.py) run with ``AZU_LINGER_S=--linger``.
Jobs of 4 tokens go one at a time, each after an idle pause of ``linger - margin`` (found awake) or
``linger + margin`` (woken), the two alternating: both kinds meet the same machine (its speed drifts over
minutes) after about as long idle (a CPU that idled runs the next burst slower: bench/idle_wake.py). A
woken job's first step pays the core's Celery message to the first worker and that worker's message to the
next (each a kombu publish, a consume and a new session), which the core's count of wake-up messages per
job shows. Medians per kind and their ratio; for scale, ``generate``'s TTFT in this process, run in the
middle of each pause (after half of it idle).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from pipeline import PETALS, PROMPT, Bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--linger", type=float, default=3.0, help="the workers' AZU_LINGER_S, seconds")
    p.add_argument("--margin", type=float, default=0.5, help="pauses are linger -/+ this, seconds")
    p.add_argument("--jobs", type=int, default=24, help="jobs in all, half of each kind")
    p.add_argument("--redis-db", type=int, default=10)
    args = p.parse_args()
    if not 0 < args.margin < args.linger:
        p.error("--margin must be above 0 and below --linger")
    os.environ["AZU_LINGER_S"] = str(args.linger)  # the workers inherit this process's environment
    bench_args = argparse.Namespace(redis_db=args.redis_db, device="cpu", dtype="float32", kernels="auto",
                                    graphs="auto", worker_logs=False, direct=False, workers_nice=0, rounds=1,
                                    split="work")
    bench = Bench(bench_args)
    pauses = {"found awake": args.linger - args.margin, "woken by Celery": args.linger + args.margin}
    ttft: dict[str, list[float]] = {kind: [] for kind in pauses}
    generate: dict[str, list[float]] = {kind: [] for kind in pauses}
    wakes: dict[str, list[int]] = {kind: [] for kind in pauses}
    try:
        model_id, src = bench.model("bench-petals", "llama", PETALS)
        bench.start_workers(["a", "b"])
        cut = bench.load_split(model_id, ["a", "b"])
        once = bench.generate_side(src, PROMPT, 4)
        from azu.network.dispatch import FORWARD
        from tests.support.network import Recording

        sent = bench.dispatch = Recording(bench.dispatch)  # counts the core's wake-up messages
        bench.run_jobs(model_id, [PROMPT], 4)  # warm-up
        for i in range(args.jobs):
            kind = list(pauses)[i % 2]
            idle_from = time.monotonic()  # the workers' last step: the pause counts from here
            time.sleep(pauses[kind] / 2)
            generate[kind].append(once()[0])  # in the middle of the pause: this process, not the workers
            time.sleep(max(0.0, idle_from + pauses[kind] - time.monotonic()))
            before = sent.count(FORWARD)
            ttft[kind].append(bench.pipeline_once(model_id, PROMPT, 4)[0])
            wakes[kind].append(sent.count(FORWARD) - before)
            print(f"job {i + 1}/{args.jobs}: {kind}, TTFT {ttft[kind][-1] * 1000:.1f} ms", file=sys.stderr)
    finally:
        bench.stop()
    woken = statistics.median(ttft["woken by Celery"])
    print(f"Petals' model ({cut}), 2 worker processes with AZU_LINGER_S={args.linger}; "
          f"{args.jobs} jobs of 4 tokens, one at a time, alternating")
    print("| job after an idle pause of | TTFT median (min-max) | vs woken | the core's wake-ups a job "
          "| `generate` TTFT (half the pause idle) |")
    print("|---|---|---|---|---|")
    for kind, pause in pauses.items():
        v = ttft[kind]
        print(f"| {pause:.1f} s ({kind}) | {statistics.median(v) * 1000:.1f} ms ({min(v) * 1000:.1f}-"
              f"{max(v) * 1000:.1f}) | {statistics.median(v) / woken:.2f}x | "
              f"{statistics.mean(wakes[kind]):.1f} | {statistics.median(generate[kind]) * 1000:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
