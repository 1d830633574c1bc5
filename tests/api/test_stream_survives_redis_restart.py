"""A stream (serving.follow, behind SSE and plain waits) outlives a Redis restart: it waits the broker out and
goes on from where it was (the events are in the AOF); past the grace it ends with an error event that says
where the answer can still be read, never with an exception that cuts the connection. Real redis-server."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import redis

from azu import serving
from azu.cli.up import find_redis_server, free_port
from azu.network import keys
from tests.support import wait_for


def _start(folder: Path, port: int) -> subprocess.Popen[bytes]:
    binary = find_redis_server()
    assert binary, "no Redis >= 7 binary"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    wait_for(lambda: _ping(probe), timeout=20, what="redis-server")
    return proc


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_stream_waits_out_a_redis_restart_and_goes_on(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, port)
    r = redis.Redis(port=port, socket_timeout=5)
    r.xadd(keys.events("j1"), {"k": "token", "t": "7"}, id="0-1")
    events = serving.follow(r, "j1", deadline=time.monotonic() + 60)
    assert next(events).token_id == 7
    proc.kill()
    proc.wait()

    def come_back() -> None:
        time.sleep(2)
        procs.append(_start(tmp_path, port))
        redis.Redis(port=port).xadd(keys.events("j1"), {"k": "done", "t": "8", "reason": "length"}, id="0-2")

    procs: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        seen = [e for e in events if e is not None]
        assert [e.kind for e in seen] == ["token", "done"] and seen[0].token_id == 8
    finally:
        thread.join()
        for p in procs:
            p.kill()


def test_past_the_grace_the_stream_ends_with_an_error_event(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(serving, "BROKER_GRACE_S", 1.0)
    port = free_port()
    proc = _start(tmp_path, port)
    r = redis.Redis(port=port, socket_timeout=5)
    r.xadd(keys.events("j2"), {"k": "token", "t": "7"}, id="0-1")
    events = serving.follow(r, "j2", deadline=time.monotonic() + 60)
    assert next(events).kind == "token"
    proc.kill()
    proc.wait()
    last = [e for e in events if e is not None][-1]
    assert last.kind == "error" and "GET /results/j2" in (last.error or "")
