"""Attack 4 (issue "Open network"): a worker reads what is not its own.

Worker w1, with the broker login its real enrollment gave it, tries to read w2's queues and inbox, the
in-flight (unacked) messages of others, job hashes (prompts), event streams, directory records, model status,
identities, the core's report list and the ``core``/``registry`` queues, and to list or watch everything.
Each attempt is refused by Redis (NOPERM) and every victim key is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import pytest
import redis

from azu.network import identity
from tests.support.security import Stranger, fresh_id, nopermission, snapshot


def _victim_data(core: redis.Redis, w2: str) -> list[str]:
    job = "azu:job:j-victim"
    core.lpush(f"gpu.{w2}", b"step payload of w2")
    core.lpush(f"ctl.{w2}", b"load order of w2")
    core.rpush(f"azu:pending:{w2}", b"pending step of w2")
    core.set(f"azu:wake:{w2}", b"1")
    core.hset(f"unacked:{w2}", "tag1", b"in-flight message of w2")
    core.zadd(f"unacked_index:{w2}", {"tag1": 1.0})
    core.hset("unacked", "tag0", b"in-flight message of a core consumer")
    core.sadd(f"_kombu.binding.gpu.{w2}", b"gpu.w2 binding")
    core.hset(job, mapping={"prompt_ids": b"[1,2,3]", "user": b"0xuser", "route": b"[]"})
    core.xadd(f"{job}:events", {"token": b"42"}, id="0-1")
    core.set(f"azu:worker:{w2}", b'{"worker_id": "w2"}')
    core.zadd("azu:workers", {w2: 1.0})
    core.zadd("azu:room", {w2: -1.0})  # where placement looks for the roomiest workers
    core.hset("azu:model:m1", mapping={"state": b"ready"})
    core.zadd("azu:model:m1:holders", {w2: 1.0})
    core.zadd("azu:model:m1:spans", {"0-2+e+h": 1.0})  # the spans held, and each span's holders: what a
    core.zadd("azu:model:m1:span:0-2+e+h:holders", {w2: 1.0})  # submit's windows read, from the turn
    core.set("azu:model:m1:turn", 7)
    core.sadd("azu:models:ready", b"m1")
    core.lpush("core", b"settle")
    core.lpush("registry", b"shard")
    core.rpush("azu:reports", b"someone's report")
    core.rpush(f"azu:reports:from:{w2}", b"w2's signed report")
    core.rpush("azu:reports:ready", w2)
    core.sadd("azu:reporters", w2)
    return [f"gpu.{w2}", f"ctl.{w2}", f"azu:pending:{w2}", f"azu:wake:{w2}", f"unacked:{w2}",
            f"unacked_index:{w2}", "unacked", f"_kombu.binding.gpu.{w2}", job, f"{job}:events",
            f"azu:worker:{w2}", "azu:workers", "azu:room", "azu:model:m1", "azu:model:m1:holders",
            "azu:model:m1:spans", "azu:model:m1:span:0-2+e+h:holders", "azu:model:m1:turn",
            "azu:models:ready",
            "core", "registry", "azu:reports", f"azu:reports:from:{w2}", "azu:reports:ready", "azu:reporters",
            identity.identity_key(w2)]


ATTEMPTS = [
    ("LLEN", "gpu.{w2}"), ("LRANGE", "gpu.{w2}", 0, -1), ("RPOP", "gpu.{w2}"), ("BRPOP", "gpu.{w2}", 1),
    ("LRANGE", "ctl.{w2}", 0, -1), ("BRPOP", "ctl.{w2}", 1),
    ("LRANGE", "azu:pending:{w2}", 0, -1), ("LPOP", "azu:pending:{w2}"), ("GET", "azu:wake:{w2}"),
    ("BLMPOP", 1, 1, "azu:pending:{w2}", "LEFT"),
    ("HGETALL", "unacked:{w2}"), ("HGET", "unacked:{w2}", "tag1"), ("HGETALL", "unacked"),
    ("ZRANGE", "unacked_index:{w2}", 0, -1), ("SMEMBERS", "_kombu.binding.gpu.{w2}"),
    ("HGETALL", "azu:job:j-victim"), ("HGET", "azu:job:j-victim", "prompt_ids"),
    ("XRANGE", "azu:job:j-victim:events", "-", "+"), ("XREAD", "STREAMS", "azu:job:j-victim:events", "0-0"),
    ("GET", "azu:worker:{w2}"), ("ZRANGE", "azu:workers", 0, -1), ("ZRANGE", "azu:room", 0, -1),
    ("HGETALL", "azu:model:m1"),
    ("ZRANGE", "azu:model:m1:holders", 0, -1), ("SMEMBERS", "azu:models:ready"), ("GET", "azu:identity:{w2}"),
    ("ZRANGE", "azu:model:m1:spans", 0, -1), ("ZRANGE", "azu:model:m1:span:0-2+e+h:holders", 0, -1),
    ("GET", "azu:model:m1:turn"),
    ("LRANGE", "core", 0, -1), ("BRPOP", "core", 1), ("LRANGE", "registry", 0, -1),
    ("LRANGE", "azu:reports", 0, -1), ("LPOP", "azu:reports"),
    ("LRANGE", "azu:reports:from:{w2}", 0, -1), ("LPOP", "azu:reports:from:{w2}"),
    ("LLEN", "azu:reports:from:{w2}"), ("SMEMBERS", "azu:reporters"), ("LRANGE", "azu:reports:ready", 0, -1),
    ("LPOP", "azu:reports:ready"), ("BLMOVE", "azu:reports:ready", "azu:reports:ready", "LEFT", "LEFT", 1),
    ("EVAL", "return redis.call('LRANGE', KEYS[1], 0, -1)", 1, "gpu.{w2}"),
    ("EVAL", "return redis.call('HGETALL', 'azu:job:j-victim')", 0),
    ("KEYS", "*"), ("SCAN", 0), ("RANDOMKEY",), ("DUMP", "azu:job:j-victim"), ("TYPE", "azu:job:j-victim"),
    ("EXISTS", "azu:job:j-victim"), ("OBJECT", "ENCODING", "azu:job:j-victim"),
    ("CONFIG", "GET", "*"), ("CLIENT", "LIST"), ("INFO",), ("ACL", "LIST"), ("ACL", "GETUSER", "w-{w2}"),
    ("MONITOR",), ("PSUBSCRIBE", "*"), ("SUBSCRIBE", "/0.celeryev/worker.heartbeat"),
]
# SELECT stays allowed (kombu selects the database of its URL). Redis ACLs are not per database: in another
# database of the same server the worker still reaches only keys with its own names, so one azu network per
# Redis server (docs/security.md).


def test_a_worker_reads_nothing_of_others(app, core):
    client = app.test_client()
    w1, w2 = Stranger(fresh_id("a")), Stranger(fresh_id("b"))
    logins = {}
    for s in (w1, w2):
        resp = s.enroll(client)
        assert resp.status_code == 201, resp.get_json()
        logins[s.worker_id] = resp.get_json()["broker_url"]
    victim = _victim_data(core, w2.worker_id)
    before = snapshot(core, victim)
    assert all(v[0] is not None for v in before.values())  # the victim data is really there

    attacker = redis.Redis.from_url(logins[w1.worker_id], socket_timeout=5)
    allowed = []
    for attempt in ATTEMPTS:
        args = [a.format(w2=w2.worker_id) if isinstance(a, str) else a for a in attempt]
        try:
            result = attacker.execute_command(*args)
        except redis.ResponseError as exc:
            if not nopermission(exc):
                allowed.append((args, f"not a permission error: {exc}"))
            continue
        except redis.ConnectionError as exc:  # MONITOR/SUBSCRIBE refusals may close the reply stream
            allowed.append((args, f"connection error instead of NOPERM: {exc}"))
            attacker = redis.Redis.from_url(logins[w1.worker_id], socket_timeout=5)
            continue
        allowed.append((args, result))
    assert allowed == []
    assert snapshot(core, victim) == before

    # The login is not simply dead: its own queue, its own inbox and the write-only hand-offs work.
    assert attacker.lpush(f"gpu.{w1.worker_id}", b"mine") == 1
    assert attacker.brpop([f"gpu.{w1.worker_id}"], timeout=1) is not None
    assert attacker.rpush(f"azu:pending:{w1.worker_id}", b"x") == 1
    assert attacker.lrange(f"azu:pending:{w1.worker_id}", 0, -1) == [b"x"]
    # Its reports go to its own list, which it may push to but not read back (nor trim, nor drain).
    own_reports = f"azu:reports:from:{w1.worker_id}"
    assert attacker.rpush(own_reports, b"my signed report") >= 1
    assert attacker.rpush("azu:reports:ready", w1.worker_id) >= 1  # the hint that goes with them
    for own in (("LRANGE", own_reports, 0, -1), ("LTRIM", own_reports, 1, 0), ("LPOP", own_reports)):
        with pytest.raises(redis.ResponseError) as refused:
            attacker.execute_command(*own)
        assert nopermission(refused.value)
    assert attacker.publish("/0.celeryev/worker.heartbeat", b"{}") >= 0


@pytest.mark.parametrize("attempt", [
    ("DEL", "gpu.{w2}"), ("LTRIM", "gpu.{w2}", 1, 0), ("RPUSH", "gpu.{w2}", "x"), ("LPUSH", "ctl.{w2}", "x"),
    ("LPUSH", "core", "x"), ("LPUSH", "registry", "x"), ("RPUSH", "ctl.{w2}", "x"),
    ("DEL", "azu:pending:{w2}"), ("LPUSH", "azu:pending:{w2}", "x"), ("SET", "azu:pending:{w2}", "x"),
    ("HSET", "azu:job:j-victim", "status", "done"), ("XADD", "azu:job:j-victim:events", "*", "token", "1"),
    ("SET", "azu:worker:{w2}", "{{}}"), ("ZADD", "azu:workers", 9e9, "{w2}"),
    # Nor climb placement's read of the roomiest workers, nor take another off it.
    ("ZADD", "azu:room", -9e15, "{w2}-2"), ("ZREM", "azu:room", "{w2}"),
    ("SET", "azu:identity:{w2}", "00"),
    ("HSET", "azu:model:m1", "state", "failed"), ("ZADD", "azu:model:m1:holders", 9e9, "{w2}"),
    # Nor the indexes a submit reads a window of, nor the counter that moves the windows.
    ("ZADD", "azu:model:m1:spans", 9e9, "0-9+e+h"),
    ("ZADD", "azu:model:m1:span:0-2+e+h:holders", 9e9, "{w2}-2"),
    ("ZREM", "azu:model:m1:span:0-2+e+h:holders", "{w2}"), ("INCR", "azu:model:m1:turn"),
    ("SET", "azu:model:m1:turn", "0"),
    ("HDEL", "unacked", "tag0"), ("FLUSHDB",), ("FLUSHALL",),
    # Reports go only to its own list: not to the shared one, not into another worker's (where they would
    # be read as that worker's), and it cannot enroll ids into the collector's reading.
    ("RPUSH", "azu:reports", "x"), ("RPUSH", "azu:reports:from:{w2}", "x"),
    ("LPUSH", "azu:reports:from:{w2}", "x"),
    ("SADD", "azu:reporters", "{w2}-2"), ("DEL", "azu:reports:from:{w2}"), ("DEL", "azu:reports:ready"),
    ("LTRIM", "azu:reports:ready", 1, 0), ("LPUSH", "azu:reports:ready", "x"),
    ("SET", "azu:wake:{w2}", "x", "GET"), ("PUBLISH", "/0.celery.pidbox", "x"),
    ("SADD", "_kombu.binding.gpu.{w2}", "x"), ("EVAL", "return 1", 1, "azu:wake:{w2}"),
])
def test_a_worker_cannot_change_what_others_read(app, core, attempt):
    client = app.test_client()
    w1, w2 = Stranger(fresh_id("a")), Stranger(fresh_id("b"))
    login = w1.enroll(client).get_json()["broker_url"]
    assert w2.enroll(client).status_code == 201
    victim = _victim_data(core, w2.worker_id)
    before = snapshot(core, victim)
    args = [a.format(w2=w2.worker_id) if isinstance(a, str) else a for a in attempt]
    with pytest.raises(redis.ResponseError) as refused:
        redis.Redis.from_url(login).execute_command(*args)
    assert nopermission(refused.value), refused.value
    assert snapshot(core, victim) == before
