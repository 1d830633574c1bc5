"""What one worker's flood of reports costs the others' reports, and what reading every worker's own list
costs the collector.

    python bench/reports.py [--sizes 2,10,100,1000] [--flood 20000] [--idle 50] [--redis-db 12]

A private Redis database (flushed before and after), ``--sizes`` enrolled workers (each id in
``azu:reporters``) and two loops in threads of this process: the collector's real loop (``collector.run``:
each worker's own list, a share of each hinted list per round, azu.network.reports) and the loop as it was
before (every worker pushes to one list; ``pop_all`` of up to 1024, then ``Collector.process``: the same
report handling). Reports are signed pongs (each costs the collector an Ed25519 check and a write). Rows:

- **a report behind a flood**: one worker pushes ``--flood`` reports at once, then another worker one report:
  how long that one waited until the collector had handled it, and how many of the flood's were handled
  before it, in each layout;
- **one report when idle**: push to handled, median of ``--idle`` reports a few ms apart, in each layout;
- **the sweep**: a round that looks at the next enrolled workers' lists (``reports.sweep_size``: 1000, or a
  fifth of those enrolled, 5000 at most; once a second, for a hint lost), median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOODER, VICTIM = "rep-00000", "rep-00001"
ONE_LIST = "bench:one-list"  # the list every worker pushed to before (azu:reports)


def pong(signer: Any, worker_id: str, key: str, value: str) -> bytes:
    from azu.network import reports

    return reports.sign(signer, worker_id, "pong", {"key": key, "value": value})


def wait_key(r: Any, key: str, timeout: float = 120.0) -> float:
    """When ``key`` appeared (polled every 0.5 ms), or raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.exists(key):
            return time.perf_counter()
        time.sleep(0.0005)
    raise TimeoutError(f"{key} never written: is the collector running?")


def old_loop(r: Any, stop: threading.Event) -> None:
    """The collector's loop before this change, on the one list every worker pushed to (no lease, no
    watchdog: neither is on a report's way)."""
    from azu.network.collector import BATCH_MAX, Collector
    from azu.network.inbox import pop_all

    collector = Collector(r, dispatch=None)  # type: ignore[arg-type]
    has_blmpop = None
    while not stop.is_set():
        got, has_blmpop, _ = pop_all(r, ONE_LIST, 0.2, has_blmpop=has_blmpop, count=BATCH_MAX)
        if got:
            collector.process(got)


def send(r: Any, worker_id: str, blobs: list[bytes], *, one_list: bool) -> None:
    from azu.network import reports

    pipe = r.pipeline(transaction=False)
    for start in range(0, len(blobs), 2000):
        if one_list:
            pipe.rpush(ONE_LIST, *blobs[start:start + 2000])
        else:
            reports.push(pipe, worker_id, blobs[start:start + 2000])
    pipe.execute()


def behind_flood(r: Any, signers: dict[str, Any], flood: list[bytes], *, one_list: bool,
                 n: int) -> tuple[float, int]:
    from azu.network import keys

    send(r, FLOODER, flood, one_list=one_list)
    marker = f"{keys.PING_PREFIX}victim-{n}-{one_list}"
    pushed = time.perf_counter()
    send(r, VICTIM, [pong(signers[VICTIM], VICTIM, marker, "1")], one_list=one_list)
    handled = wait_key(r, marker)
    before = int(r.get(f"{keys.PING_PREFIX}flood") or -1) + 1
    last = str(len(flood) - 1).encode()
    while r.get(f"{keys.PING_PREFIX}flood") != last:  # drained before the next row
        time.sleep(0.01)
    r.delete(f"{keys.PING_PREFIX}flood")
    return handled - pushed, before


def idle_wait(r: Any, signers: dict[str, Any], count: int, *, one_list: bool, n: int) -> float:
    from azu.network import keys

    waits = []
    for i in range(count):
        marker = f"{keys.PING_PREFIX}idle-{n}-{one_list}-{i}"
        blob = pong(signers[VICTIM], VICTIM, marker, "1")
        time.sleep(0.005)
        pushed = time.perf_counter()
        send(r, VICTIM, [blob], one_list=one_list)
        waits.append(wait_key(r, marker) - pushed)
    return statistics.median(waits)


def sweep_cost(r: Any, n: int, count: int = 50) -> float:
    from azu.network.reports import ReportLists, sweep_size

    lists = ReportLists(r, "bench:sweep")
    ids = [f"rep-{i:05d}" for i in range(n)][:sweep_size(n)]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        lists.take(None, also=ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,10,100,1000", help="enrolled workers, rising")
    p.add_argument("--flood", type=int, default=20000, help="reports the flooding worker pushes at once")
    p.add_argument("--idle", type=int, default=50, help="reports timed one by one when the collector is idle")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    a = p.parse_args()

    import redis
    from nacl.signing import SigningKey

    from azu.network import auth, collector, keys

    r = redis.Redis.from_url(f"{a.redis}/{a.redis_db}")
    r.flushdb()
    signers = {w: SigningKey.generate() for w in (FLOODER, VICTIM)}
    for w, signer in signers.items():
        r.set(keys.identity(w), auth.public_hex(signer))
    print(f"signing the flood ({a.flood} reports)...", flush=True)
    flood = [pong(signers[FLOODER], FLOODER, f"{keys.PING_PREFIX}flood", str(i)) for i in range(a.flood)]
    stop = threading.Event()
    loops = [threading.Thread(target=collector.run, kwargs={"r": r, "stop_event": stop, "dispatch": None},
                              daemon=True),
             threading.Thread(target=old_loop, args=(r, stop), daemon=True)]
    for loop in loops:
        loop.start()
    rows = []
    try:
        enrolled = 0
        for n in (int(x) for x in a.sizes.split(",")):
            r.sadd(keys.REPORTERS, *(f"rep-{i:05d}" for i in range(enrolled, n)))
            enrolled = n
            time.sleep(1.5)  # the loop reads the enrolled ids about once a second
            print(f"{n} enrolled workers...", flush=True)
            before = behind_flood(r, signers, flood, one_list=True, n=n)
            now = behind_flood(r, signers, flood, one_list=False, n=n)
            rows.append((n, before, now, idle_wait(r, signers, a.idle, one_list=True, n=n),
                         idle_wait(r, signers, a.idle, one_list=False, n=n), sweep_cost(r, n)))
    finally:
        stop.set()
        for loop in loops:
            loop.join(5)
        r.flushdb()

    print(f"\nOne worker pushes {a.flood} signed reports, then another worker one: that one's wait, and how "
          "many of the flood were handled before it")
    print("| enrolled workers | one list (before): wait | handled before it | own lists (now): wait "
          "| handled before it | before / now |")
    print("|---|---|---|---|---|---|")
    for n, (b_wait, b_before), (n_wait, n_before), *_ in rows:
        print(f"| {n} | {b_wait * 1e3:.0f} ms | {b_before} | {n_wait * 1e3:.1f} ms | {n_before} | "
              f"{b_wait / n_wait:.0f}x |")
    print("\nOne report when the collector is idle (push to handled, median), and a sweep round "
          "(``reports.sweep_size`` lists: 1000 up to 5000 enrolled, a fifth of them beyond, 5000 at most)")
    print("| enrolled workers | one list (before) | own lists (now) | a sweep (once a second) |")
    print("|---|---|---|---|")
    for n, _, _, idle_before, idle_now, sweep in rows:
        print(f"| {n} | {idle_before * 1e3:.2f} ms | {idle_now * 1e3:.2f} ms | {sweep * 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
