"""Latency benchmark: decode tokens/s at batch 1 through two workers on their own hosts, with a delaying relay
of 0, 5, 25 and 50 ms one way (10, 50 and 100 ms round trip) between each worker and the core; and the
aggregate tokens/s of ``--streams`` answers at once against one. Each delay runs for each of ``--paths``:
``redis`` (hand-overs through the core's Redis) and ``direct`` (worker to worker, azu.network.direct, with a
relay of the same delay between the two workers).

    sudo python bench/latency.py [--delays 0,5,25,50] [--paths redis,direct] [--tokens 48] [--repeat 3]
                                 [--streams 16] [--json out]

Needs root (network namespaces: tests/support/hosts.py). The core (Redis, API, scheduler) runs in one
namespace, each worker in another; with a delay d > 0 every byte between a worker and the core's Redis or API
waits d in a relay on the test host's bridge address (this kernel has no ``netem``).

A decode step crosses the network 4 times with 2 workers: A hands its hidden state to B through Redis
(A -> Redis, Redis -> B) and B hands the sampled token back to A the same way. So the bound for a delay d is

    per-token time  <=  t0 + 4 d        (t0: the per-token time measured with no delay)

and ``ratio`` = measured tokens/s / bound tokens/s: 1.00 means the network adds nothing beyond the hops'
own latency; less means extra round trips per step (a Celery wake-up, an ack, a poll interval). On the
direct path a step crosses twice (A -> B, B -> A): the bound is t0 + 2 d, t0 the direct path's own.

The relay is a Python event loop on a machine the workers keep busy: it sends each chunk somewhat after its
due time (its timer wakes late), so a crossing takes d plus that. ``relay late`` is the mean lateness of the
chunks the Redis relay sent during the timed single answers, and ``ratio*`` the ratio to the bound with
crossings of d + that lateness (still optimistic: a chunk read late by the relay is not counted).
Tokens/s = (N - 1) / (T(N tokens) - T(1 token)), each time the best of ``--repeat`` answers.

Many streams: ``--streams`` answers of N tokens requested at once (threads); aggregate = all completion tokens
/ the wall time of the slowest, compared with the same measure for one answer (target: >= 10x at 50 ms).

Time to first token after idle (``--idle-pairs K``, with ``--linger L``: every process's ``AZU_LINGER_S``):
K pairs of one-token answers, each after a pause of L - 1 to L - 0.5 s (the workers still wait on their
inboxes) and L + 0.5 to L + 1 s (their sessions have ended: the job wakes each worker with a Celery message),
at random within those, alternating; the median, mean and worst per kind (bench/ttft_idle.py is the same on
one host, against ``generate``). Between hosts a woken
hop pays more crossings than an awake one: the sender's ``SET NX`` on the wake key before its Celery message,
the consumer's delivery, and the new session's first take from its list.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hosts import (
    MODEL_ID,
    DelayRelay,
    Hosts,
    core_relays,
    hosts_unavailable,
    start_host_network,
)

MESSAGES = [{"role": "user", "content": "Once upon a time"}]
CROSSINGS_PER_STEP = {"redis": 4, "direct": 2}  # 2 workers: A -> Redis -> B, B -> Redis -> A; or A -> B -> A
P2P_PORT = 8003  # each worker namespace has its own ports
IDLE_MARGIN_S = 0.5  # --idle-pairs: pauses this far inside and past the linger


def answer_time(api_url: str, tokens: int) -> tuple[float, int]:
    """One chat completion: (seconds, completion tokens)."""
    start = time.monotonic()
    resp = requests.post(api_url + "/v1/chat/completions", headers={"Authorization": "Bearer bench"},
                         timeout=600, json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": tokens,
                                            "temperature": 0})
    elapsed = time.monotonic() - start
    resp.raise_for_status()
    return elapsed, int(resp.json()["usage"]["completion_tokens"])


def decode_rate(api_url: str, tokens: int, repeat: int) -> tuple[float, int]:
    """Decode tokens/s: (T(tokens) - T(1)) / (tokens - 1), each the best of ``repeat`` answers (streamed
    chunks cannot be timed per token: the stream decoder holds back partial characters)."""
    one = min(answer_time(api_url, 1)[0] for _ in range(repeat))
    runs = [answer_time(api_url, tokens) for _ in range(repeat)]
    n = runs[0][1]
    if n < 2 or any(k != n for _, k in runs):
        raise RuntimeError(f"answers of {[k for _, k in runs]} tokens cannot be compared")
    return (n - 1) / (min(t for t, _ in runs) - one), n


def aggregate_rate(api_url: str, tokens: int, streams: int) -> float:
    """Completion tokens/s of ``streams`` answers requested at once (all tokens / wall time)."""
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        got = list(pool.map(lambda _: answer_time(api_url, tokens)[1], range(streams)))
    return sum(got) / (time.monotonic() - start)


def idle_first_tokens(api_url: str, pairs: int, linger_s: float) -> dict[str, float]:
    """Time of a one-token answer (median, mean, max) after a pause just inside the workers' linger (awake)
    and just past it (woken by Celery), ``pairs`` of each, alternating (the machine's speed drifts over
    minutes)."""
    pauses = {"awake": linger_s - 2 * IDLE_MARGIN_S, "woken": linger_s + IDLE_MARGIN_S}
    times: dict[str, list[float]] = {kind: [] for kind in pauses}
    jitter = random.Random(0)
    for i in range(2 * pairs):
        kind = list(pauses)[i % 2]
        # Plus up to a margin more, at random: an idle worker waits in slices (azu.network.node.WAIT_SLICE_S),
        # and pauses of a whole number of them would land every job at the same point of a slice.
        time.sleep(pauses[kind] + jitter.uniform(0, IDLE_MARGIN_S))
        times[kind].append(answer_time(api_url, 1)[0])
    out = {}
    for kind, v in times.items():
        out.update({f"ttft_{kind}_ms": 1000 * statistics.median(v),
                    f"ttft_{kind}_mean_ms": 1000 * statistics.mean(v), f"ttft_{kind}_max_ms": 1000 * max(v)})
    return out


def direct_addresses(hosts: Hosts, stack: contextlib.ExitStack,
                     delay_ms: float) -> tuple[list[dict[str, str]], list[DelayRelay]]:
    """Each worker's P2P settings: it listens on its own namespace's port; the others reach it through a
    relay of ``delay_ms`` on the bridge (or straight, with no delay). Returns (settings, relays)."""
    env, relays = [], []
    for i in range(len(hosts.workers)):
        url = f"tcp://{hosts.worker_addr(i)}:{P2P_PORT}"
        if delay_ms > 0:
            relay = stack.enter_context(DelayRelay(listen_host=hosts.host_addr, delay_s=delay_ms / 1000,
                                                   upstream=(hosts.worker_addr(i), P2P_PORT)))
            relays.append(relay)
            url = f"tcp://{hosts.host_addr}:{relay.port}"
        env.append({"P2P_PUBLIC_URL": url, "AZU_P2P_LISTEN": f"0.0.0.0:{P2P_PORT}"})
    return env, relays


def measure(hosts: Hosts, registry: Path, root: Path, delay_ms: float, path: str, tokens: int, repeat: int,
            env: dict[str, str], streams: int, idle_pairs: int = 0, linger_s: float = 0.0) -> dict:
    with contextlib.ExitStack() as stack:
        public_redis = public_api = None
        relays: list[DelayRelay] = []
        if delay_ms > 0:
            rr, ra = stack.enter_context(core_relays(hosts, delay_s=delay_ms / 1000))
            public_redis, public_api = f"{hosts.host_addr}:{rr.port}", f"{hosts.host_addr}:{ra.port}"
            relays = [rr]
        worker_env = None
        if path == "direct":
            worker_env, relays = direct_addresses(hosts, stack, delay_ms)
        net = start_host_network(hosts, registry_dir=registry, root=root / f"{path}-d{delay_ms:g}",
                                 extra_env=env, public_redis=public_redis, public_api=public_api,
                                 worker_env=worker_env)
        stack.callback(net.stop)
        answer_time(net.api_url, 2)  # the workers load their layers on the first job
        before = [(relay.late_s, relay.sent_chunks) for relay in relays]
        rate, n = decode_rate(net.api_url, tokens, repeat)
        late = sum(relay.late_s - b[0] for relay, b in zip(relays, before, strict=True))
        sent = sum(relay.sent_chunks - b[1] for relay, b in zip(relays, before, strict=True))
        if path == "direct" and delay_ms > 0 and not sum(relay.connections for relay in relays):
            raise RuntimeError("no hand-over took the direct path's relays: see the worker logs in "
                               f"{net.logs}")
        row = {"delay_ms": delay_ms, "path": path, "tokens_per_s": rate, "completion_tokens": n,
               "relay_late_ms": 1000 * late / sent if sent else 0.0}
        if streams > 1:
            one = max(aggregate_rate(net.api_url, tokens, 1) for _ in range(repeat))
            many = max(aggregate_rate(net.api_url, tokens, streams) for _ in range(repeat))
            row.update(one_stream_tokens_per_s=one, streams=streams, streams_tokens_per_s=many,
                       streams_ratio=many / one)
        if idle_pairs:
            row.update(idle_first_tokens(net.api_url, idle_pairs, linger_s))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delays", default="0,5,25,50",
                   help="one-way delays in ms, comma-separated (first: 0); round trip = 2x")
    p.add_argument("--paths", default="redis,direct", help="hand-over paths to run (redis, direct)")
    p.add_argument("--tokens", type=int, default=48, help="max_tokens of each timed answer")
    p.add_argument("--repeat", type=int, default=3, help="timed answers per delay (best is reported)")
    p.add_argument("--streams", type=int, default=16, help="concurrent answers for the aggregate (1: skip)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for every process (e.g. AZU_LINGER_S=0.5); repeatable")
    p.add_argument("--idle-pairs", type=int, default=0,
                   help="pairs of one-token answers after an idle pause inside / past the linger (0: skip)")
    p.add_argument("--linger", type=float, default=3.0,
                   help="with --idle-pairs: every process's AZU_LINGER_S, seconds (pauses: this -1 to "
                        "-0.5 s, +0.5 to +1 s)")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    if a.idle_pairs and a.linger <= 2 * IDLE_MARGIN_S:
        p.error(f"--linger must be above {2 * IDLE_MARGIN_S:g} s")
    why = hosts_unavailable()
    if why:
        sys.exit(why)
    env = dict(item.split("=", 1) for item in a.env)
    if a.idle_pairs:
        env["AZU_LINGER_S"] = str(a.linger)
    delays = [float(d) for d in a.delays.split(",")]
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not paths or any(p not in CROSSINGS_PER_STEP for p in paths):
        sys.exit(f"--paths: choose from {', '.join(CROSSINGS_PER_STEP)}")
    if delays[0] != 0:
        delays.insert(0, 0.0)  # the bound is built on the no-delay time

    from azu.cli.demo import build_demo_model
    from azu.registry.sharder import shard_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="azu-latency-") as tmp:
        root = Path(tmp)
        src = build_demo_model(root / "models" / MODEL_ID)
        shard_model(src, root / "registry" / MODEL_ID, progress=False)
        for delay in delays:
            for path in paths:
                with Hosts(2) as hosts:  # fresh hosts each time: nothing carried over between runs
                    rows.append(measure(hosts, root / "registry", root, delay, path, a.tokens, a.repeat, env,
                                        a.streams, a.idle_pairs, a.linger))
                print(f"  {delay:g} ms, {path}: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    t0 = {row["path"]: 1 / row["tokens_per_s"] for row in rows if row["delay_ms"] == 0}
    print(f"{'round trip':>11} {'path':>7} {'tokens/s':>9} {'ms/token':>9} {'bound tok/s':>12} {'ratio':>6} "
          f"{'relay late':>11} {'ratio*':>7} {'vs redis':>9} {'streams':>8} {'aggregate':>10} {'vs one':>7}")
    redis_rate = {row["delay_ms"]: row["tokens_per_s"] for row in rows if row["path"] == "redis"}
    for row in rows:
        crossings = CROSSINGS_PER_STEP[row["path"]]
        bound = 1 / (t0[row["path"]] + crossings * row["delay_ms"] / 1000)
        crossing_s = (row["delay_ms"] + row["relay_late_ms"]) / 1000  # lateness 0 with no relay
        measured_bound = 1 / (t0[row["path"]] + crossings * crossing_s)
        row.update(ms_per_token=1000 / row["tokens_per_s"], bound_tokens_per_s=bound,
                   ratio=row["tokens_per_s"] / bound,
                   ratio_measured_crossings=row["tokens_per_s"] / measured_bound)
        vs = (f"{row['tokens_per_s'] / redis_rate[row['delay_ms']]:>8.2f}x" if row["delay_ms"] in redis_rate
              else f"{'':>9}")
        many = (f"{row['streams']:>8d} {row['streams_tokens_per_s']:>10.1f} {row['streams_ratio']:>6.2f}x"
                if "streams" in row else "")
        print(f"{2 * row['delay_ms']:>8g} ms {row['path']:>7} {row['tokens_per_s']:>9.1f} "
              f"{row['ms_per_token']:>9.1f} {bound:>12.1f} {row['ratio']:>6.2f} "
              f"{row['relay_late_ms']:>8.2f} ms "
              f"{row['ratio_measured_crossings']:>7.2f} {vs} {many}")
    if a.idle_pairs:
        print(f"\ntime to first token (one-token answers through the API, medians of {a.idle_pairs}), "
              f"AZU_LINGER_S={a.linger:g}:")
        print(f"{'round trip':>11} {'path':>7} {'awake':>9} {'woken':>9} {'woken - awake':>14} "
              f"{'awake/woken':>12} {'awake mean, max':>16} {'woken mean, max':>16}")
        for row in rows:
            awake, woken = row["ttft_awake_ms"], row["ttft_woken_ms"]
            print(f"{2 * row['delay_ms']:>8g} ms {row['path']:>7} {awake:>6.1f} ms {woken:>6.1f} ms "
                  f"{woken - awake:>11.1f} ms {awake / woken:>11.2f}x "
                  f"{row['ttft_awake_mean_ms']:>7.1f}, {row['ttft_awake_max_ms']:>5.0f} ms "
                  f"{row['ttft_woken_mean_ms']:>7.1f}, {row['ttft_woken_max_ms']:>5.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
