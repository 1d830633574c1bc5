"""What a hop's transport costs: azu's Redis hand-over against a direct TCP connection between the processes.

    python bench/hop_transport.py [--rounds 2000] [--pause-ms 5] [--redis-url redis://127.0.0.1:6379/11]

Two processes hand a payload back and forth. Through Redis, as the workers do (azu.network.inbox): the sender
writes the worker's ``pending`` list in one pipeline (RPUSH, EXPIRE, SET NX of its wake key: a round trip to
Redis), and the receiver, blocked in BLMPOP on that list, is woken by Redis. Directly: the same bytes,
length-prefixed, over one loopback TCP connection (TCP_NODELAY) that the receiver is blocked reading. Before
each round the first process pauses (``--pause-ms``, as a stage waits while the other computes), so every
hand-over wakes a process that was idle, as in the pipeline.

A hop = half a round (p50 / p99 over ``--rounds``). The difference is the most a direct worker-to-worker path
could save a hop on one machine: the checks, signatures and unpacking of a step bundle stay the same on any
transport. Between hosts it saves more: a hand-over through Redis crosses the network twice (sender to Redis,
Redis to receiver), a direct one once (bench/latency.py counts those crossings).

The second process is this file run as a script (``python bench/hop_transport.py --child ...``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

from _support import REPO, pythonpath

sys.path.insert(0, str(REPO))

# (label, payload bytes): a decode step's hidden state in fp32 (a safetensors header adds ~80 bytes), and a
# 128-position prompt chunk of the Qwen shape (AZU_PREFILL_CHUNK).
PAYLOADS = [("hidden 512 (Petals' model), 1 row", 512 * 4 + 80),
            ("hidden 896 (Qwen shape), 1 row", 896 * 4 + 80),
            ("hidden 4096 (7B shape), 1 row", 4096 * 4 + 80),
            ("hidden 896, 128-row prompt chunk", 128 * 896 * 4 + 80)]
WAKE_TTL_S = 600


def _redis_ends(url: str, me: str, other: str):
    """(send, receive) over azu's inbox keys: ``me`` takes from its own list, hands to ``other``'s."""
    import redis

    from azu.network import inbox, keys

    r = redis.Redis.from_url(url)
    box = inbox.Inbox(r, me)
    r.set(keys.wake(other), "1", ex=WAKE_TTL_S)  # the other side counts as awake: no Celery wake-up

    def no_wake(*_: object, **__: object) -> None:
        raise AssertionError("a wake-up message was asked for: the wake key expired")

    def send(blob: bytes) -> None:
        inbox.deliver(r.pipeline(transaction=False), {other: blob}, dispatch=no_wake)  # type: ignore[arg-type]

    def receive() -> bytes:
        while True:
            got = box.wait(5.0)
            if got:
                assert len(got) == 1
                return got[0]

    return send, receive


def _socket_ends(sock: socket.socket):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("the other process closed the connection")
            out += chunk
        return bytes(out)

    def send(blob: bytes) -> None:
        sock.sendall(len(blob).to_bytes(8, "little") + blob)

    def receive() -> bytes:
        return read(int.from_bytes(read(8), "little"))

    return send, receive


def _child(transport: str, rounds: int, where: str) -> None:
    """The echoing side: every payload received goes straight back."""
    if transport == "redis":
        send, receive = _redis_ends(where, "bench-hop-b", "bench-hop-a")
    else:
        host, port = where.rsplit(":", 1)
        send, receive = _socket_ends(socket.create_connection((host, int(port))))
    print("ready", flush=True)
    for _ in range(rounds):
        send(receive())


def measure(transport: str, size: int, rounds: int, pause_s: float, redis_url: str) -> list[float]:
    """Seconds per hop (half a round) of ``rounds`` rounds of ``size`` bytes each way."""
    listener = None
    if transport == "redis":
        import redis

        from azu.network import keys

        redis.Redis.from_url(redis_url).delete(*(keys.pending(w) for w in ("bench-hop-a", "bench-hop-b")))
        where = redis_url
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        where = f"127.0.0.1:{listener.getsockname()[1]}"
    child = subprocess.Popen([sys.executable, __file__, "--child", transport, str(rounds), where],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": pythonpath()})
    try:
        if listener is not None:
            conn, _ = listener.accept()
            send, receive = _socket_ends(conn)
        else:
            send, receive = _redis_ends(redis_url, "bench-hop-a", "bench-hop-b")
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        hops = []
        for _ in range(rounds):
            time.sleep(pause_s)
            started = time.perf_counter()
            send(payload)
            back = receive()
            hops.append((time.perf_counter() - started) / 2)
            assert back == payload
        return hops
    finally:
        child.wait(timeout=30)
        if listener is not None:
            listener.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2000,
                   help="rounds per payload (a tenth for the prompt chunk)")
    p.add_argument("--pause-ms", type=float, default=5.0,
                   help="pause before each round (the other stage's compute)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return
    rows = []
    for label, size in PAYLOADS:
        rounds = args.rounds if size < 1 << 16 else max(20, args.rounds // 10)
        got = {t: measure(t, size, rounds, args.pause_ms / 1000, args.redis_url) for t in ("redis", "socket")}

        def us(hops: list[float], q: int) -> float:
            """The ``q``-th percentile of ``hops``, in microseconds."""
            return statistics.quantiles(hops, n=100)[q - 1] * 1e6

        r50, s50 = us(got["redis"], 50), us(got["socket"], 50)
        rows.append([label, f"{size}", f"{r50:.0f} / {us(got['redis'], 99):.0f}",
                     f"{s50:.0f} / {us(got['socket'], 99):.0f}", f"{r50 - s50:.0f}", f"{r50 / s50:.1f}x"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    head = ["payload", "bytes", "Redis hand-over, us a hop (p50 / p99)", "direct TCP, us a hop (p50 / p99)",
            "saved a hop, p50 (us)", "Redis / direct"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(f"\nhop transport, {args.rounds} rounds, {args.pause_ms:g} ms idle before each")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
