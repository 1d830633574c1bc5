"""Attack 9 (issue "Open network"): a worker tries to stop the network.

A real core Celery worker (``celery -A workers worker -Q core``, remote control on, the core's login) runs.
Worker w1, with the login its real enrollment gave it, broadcasts ``shutdown``, ``add_consumer`` and
``rate_limit`` by Celery remote control, pings/inspects, and sends tasks to the ``core``, ``registry`` and
another worker's ``ctl.*`` queues. Every attempt is refused at the broker (NOPERM); the core worker is still
running, still answers the core's inspect, and still consumes only ``core``; the queues are unchanged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from tests.support import REPO, wait_for
from tests.support.security import CORE_SEED, Stranger, fresh_id, make_app, nopermission, snapshot

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _celery(broker_url: str) -> Celery:
    app = Celery("probe", broker=broker_url)
    app.conf.broker_transport_options = {"priority_steps": [0]}
    app.conf.task_serializer = "msgpack"
    app.conf.accept_content = ["msgpack", "json"]
    return app


@pytest.fixture
def core_worker(core_redis_url, tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    name = f"core-{secrets.token_hex(3)}@probe"
    env = {k: v for k, v in os.environ.items() if k not in ("AZU_WORKER_ID", "DATABASE_URL")}
    env.update(REDIS_URL=core_redis_url, PYTHONPATH=str(REPO), AUTH_SECRET_KEY=CORE_SEED)
    log = open(tmp_path / "core-worker.log", "wb")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "core", "-n", name,
            "--pool", "solo", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    proc = subprocess.Popen(argv,
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ops = _celery(core_redis_url)

    def answers() -> bool:
        assert proc.poll() is None, (tmp_path / "core-worker.log").read_text()[-3000:]
        return bool(ops.control.ping(destination=[name], timeout=0.5))

    try:
        wait_for(answers, timeout=60, what="the core worker to answer ping", interval=0.2)
        yield proc, name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_a_worker_cannot_stop_or_steer_the_core(core, core_redis_url, core_worker, monkeypatch):
    proc, name = core_worker
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "off")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    client = make_app({"REDIS_URL": core_redis_url}).test_client()
    w1, w2 = Stranger(fresh_id("a")), Stranger(fresh_id("b"))
    login = w1.enroll(client).get_json()["broker_url"]
    assert w2.enroll(client).status_code == 201
    core.lpush("registry", b"queued shard")
    watched = ["core", "registry", f"ctl.{w2.worker_id}", f"gpu.{w2.worker_id}"]
    before = snapshot(core, watched)

    attacker = _celery(login)
    attempts = {
        "shutdown": lambda: attacker.control.broadcast("shutdown"),
        "shutdown to the core": lambda: attacker.control.shutdown(destination=[name]),
        "add_consumer registry": lambda: attacker.control.add_consumer("registry", destination=[name],
                                                                        reply=True, timeout=1),
        "cancel_consumer core": lambda: attacker.control.cancel_consumer("core", destination=[name]),
        "rate_limit": lambda: attacker.control.rate_limit("workers.scheduler.settle", "1/h",
                                                          destination=[name]),
        "ping": lambda: attacker.control.ping(timeout=1),
        "inspect active": lambda: attacker.control.inspect(timeout=1).active(),
        "task on core": lambda: attacker.send_task("workers.scheduler.settle", kwargs={"job_id": "x"},
                                                   queue="core", exchange="", routing_key="core", declare=[]),
        "task on registry": lambda: attacker.send_task("workers.registry.shard", queue="registry",
                                                       exchange="", routing_key="registry", declare=[]),
        "task on ctl of w2": lambda: attacker.send_task(
            "workers.stage.load", queue=f"ctl.{w2.worker_id}", exchange="", routing_key=f"ctl.{w2.worker_id}",
            declare=[]),
        "task on core, declared": lambda: attacker.send_task("workers.scheduler.settle", queue="core"),
    }
    not_refused = {}
    for what, attempt in attempts.items():
        try:
            result = attempt()
        except Exception as exc:
            if not nopermission(exc) and not nopermission(exc.__cause__ or exc):
                not_refused[what] = f"{type(exc).__name__}: {exc}"
            continue
        not_refused[what] = f"accepted: {result!r}"
    assert not_refused == {}

    # The core worker is still up, answers the core's login, and still consumes only its own queue.
    ops = _celery(core_redis_url)
    assert proc.poll() is None
    assert ops.control.ping(destination=[name], timeout=2)
    queues = ops.control.inspect(destination=[name], timeout=2).active_queues()
    assert [q["name"] for q in queues[name]] == ["core"]
    assert snapshot(core, watched) == before
    # The attacker's login still works for what is its own (the refusals were not a dead connection).
    own = redis.Redis.from_url(login)
    assert own.lpush(f"gpu.{w1.worker_id}", b"x") == 1


def test_a_worker_cannot_stall_redis_with_a_script(core, core_redis_url, monkeypatch):
    """A worker's login runs no Lua: a script that loops would hold Redis (every inbox, report and Celery
    message of the network) until someone killed it. Each way in is refused, and the core's Redis answers."""
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "off")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    client = make_app({"REDIS_URL": core_redis_url}).test_client()
    w1 = Stranger(fresh_id("s"))
    login = w1.enroll(client).get_json()["broker_url"]
    own = f"azu:pending:{w1.worker_id}"
    loop = "while true do end"
    attacker = redis.Redis.from_url(login, socket_timeout=3)
    attempts = {
        "EVAL": lambda: attacker.eval(loop, 0),
        "EVAL on its own key": lambda: attacker.eval(loop, 1, own),
        "SCRIPT LOAD": lambda: attacker.script_load(loop),
        "EVALSHA": lambda: attacker.evalsha(core.script_load(loop), 0),
        "EVAL_RO": lambda: attacker.execute_command("EVAL_RO", loop, 0),
        "FUNCTION LOAD": lambda: attacker.function_load(
            "#!lua name=stall\nredis.register_function('stall', function() while true do end end)"),
        "FCALL": lambda: attacker.fcall("stall", 0),
    }
    not_refused = {}
    try:
        for what, attempt in attempts.items():
            try:
                result = attempt()
            except redis.ResponseError as exc:
                if not nopermission(exc):
                    not_refused[what] = f"{type(exc).__name__}: {exc}"
                continue
            except redis.RedisError as exc:  # a timeout: the script ran
                not_refused[what] = f"{type(exc).__name__}: {exc}"
                continue
            not_refused[what] = f"accepted: {result!r}"
    finally:
        with contextlib.suppress(redis.RedisError):
            core.script_kill()  # should the login run one after all, the rest of the suite needs Redis back
    assert not_refused == {}
    assert core.ping()
    # The login still does what it is for: its inbox and reports (the refusals were not a dead connection).
    assert attacker.rpush(own, b"x") == 1 and attacker.lrange(own, 0, -1) == [b"x"]


def _pong(who: Stranger, key: str, value: str, *, named: str | None = None) -> bytes:
    """A report as ``who`` signs it (``named``: the worker id it claims to come from)."""
    from azu.network import reports

    return reports.sign(who.key, named or who.worker_id, "pong", {"key": key, "value": value})


def test_a_worker_flooding_its_reports_delays_only_its_own(core, core_redis_url, core_worker, monkeypatch):
    """w1, with its real login, pushes 20,000 validly signed reports (each costs the real collector, in the
    core Celery worker, an Ed25519 check and a write) and 200,000 junk hints; then w2 and w3 send one report
    each. Both are handled while most of the flood still waits: the collector takes a share of each worker's
    own list per round, drops a backlog of hints (their lists found by the sweep of the enrolled workers'
    lists, or their hint pushed after the drop); and w1 can push to no list but its own (on the one list
    every worker used to push to, each waited for all 20,000). A report w1 signs in w2's name is refused."""
    from azu.network import reports

    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    monkeypatch.setenv("AZU_RATE_LIMIT_ACCOUNTS", "off")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    client = make_app({"REDIS_URL": core_redis_url}).test_client()
    w1, w2, w3 = Stranger(fresh_id("f")), Stranger(fresh_id("v")), Stranger(fresh_id("q"))
    flooder, victim, quiet = (redis.Redis.from_url(w.enroll(client).get_json()["broker_url"])
                              for w in (w1, w2, w3))
    flood_list = f"azu:reports:from:{w1.worker_id}"
    for who, login in ((w1, flooder), (w2, victim)):  # each login sends as a worker node does
        reports.push(login, who.worker_id, [_pong(who, f"azu:ping:ready-{who.worker_id}", "1")])
        wait_for(lambda who=who: core.get(f"azu:ping:ready-{who.worker_id}"), timeout=20,
                 what=f"the collector to read {who.worker_id}'s list")

    # In w2's name, from w1's list: refused before its signature is even checked.
    reports.push(flooder, w1.worker_id, [_pong(w1, "azu:ping:forged", "1", named=w2.worker_id)])
    flood = [_pong(w1, "azu:ping:flood", str(i)) for i in range(20_000)]
    pipe = flooder.pipeline(transaction=False)
    for start in range(0, len(flood), 2000):
        reports.push(pipe, w1.worker_id, flood[start:start + 2000])
        pipe.rpush("azu:reports:ready", *(f"junk-{start * 10 + i}" for i in range(20_000)))
    pipe.execute()
    reports.push(victim, w2.worker_id, [_pong(w2, "azu:ping:victim", "1")])
    reports.push(quiet, w3.worker_id, [_pong(w3, "azu:ping:quiet", "1")])
    left = {}
    for who, marker in (("w2", "azu:ping:victim"), ("w3", "azu:ping:quiet")):
        wait_for(lambda marker=marker: core.get(marker), timeout=60, interval=0.005, what=f"{who}'s report")
        left[who] = core.llen(flood_list)
    print(f"when w2's and w3's reports were handled, {left} of the flood's {len(flood)} were still waiting")
    assert left["w2"] > len(flood) // 2 and left["w3"] > len(flood) // 4, left
    assert core.get("azu:ping:forged") is None
    # The flood's own reports are all handled, in the order w1 sent them (the last one is the last written).
    last = str(len(flood) - 1).encode()
    wait_for(lambda: core.get("azu:ping:flood") == last, timeout=120, what="the flood to be handled")
    assert core.llen(flood_list) == 0 and core.get("azu:ping:forged") is None
