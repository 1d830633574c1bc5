"""No hold left behind (azu.billing.reconcile): the real PostgreSQL ledger and a real redis-server of this
module's own (a throwaway process, so the shared test Redis is untouched), restarted for real where a test
needs Redis to forget or to remember."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select, text

from azu.billing import economics
from azu.billing.ledger import service
from azu.billing.ledger.billing import LedgerBilling
from azu.billing.ledger.db import session_scope
from azu.billing.ledger.models import Hold, JournalTransaction
from azu.billing.reconcile import FORGOTTEN, ReconcileReport, reconcile
from azu.cli.up import find_redis_server
from azu.engine.span import Span
from azu.network import auth, jobs, keys
from azu.network.wire import EndOrder, Hop, Sampling, end_order_part, unpack_inbox
from tests.support import wait_for
from tests.support.network import Recording
from tests.support.security import CORE_SEED

pytestmark = pytest.mark.postgres

ALICE = "0x00000000000000000000000000000000000A11CE"
FUNDS = 10_000
PRICE = 2
MODEL = "tiny/reconcile"
ROUTE = (Hop("w-a", Span(0, 2, True, False)), Hop("w-b", Span(2, 4, False, True)))
PROMPT = [5, 6, 7]


# --- a redis-server of our own ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server (>= 7, as azu needs; ``azu up``'s own choice of binary) on a free port with its data in
    ``folder``; ``restart`` keeps port and folder."""

    def __init__(self, folder: Path, *, aof: bool) -> None:
        self.folder, self.aof, self.port = folder, aof, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        # appendfsync always here (production: everysec) so the test need not wait for a background fsync.
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        binary = _redis_binary()
        if binary is None:
            pytest.fail("no redis-server >= 7 (see azu up's NO_REDIS)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.folder), *persistence], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = self.client()
        wait_for(lambda: _pings(probe), timeout=30, what="redis-server to answer PING")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)

    def restart(self) -> None:
        """SHUTDOWN NOSAVE (no snapshot: only the AOF, if on, carries anything over) and start again."""
        assert self.proc is not None
        with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it goes
            self.client().shutdown(nosave=True)
        self.proc.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@functools.cache
def _redis_binary() -> str | None:
    return find_redis_server()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), aof=False)
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)  # the core's key: end records and grants are signed
    client = redis_server.client()
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def billing(engine: Engine) -> LedgerBilling:
    return LedgerBilling(engine, price_per_token_layer=PRICE)


# --- jobs as the core writes them ------------------------------------------------------------------------
def hold(engine: Engine, job_id: str, *, age_s: float = 0.0) -> None:
    """Fund Alice and hold her whole balance for ``job_id``, placed ``age_s`` seconds ago."""
    with session_scope(engine) as s:
        service.credit_deposit(s, tx_id=f"0x{job_id}", sender=ALICE, amount=FUNDS)
        service.place_hold(s, job_id=job_id, user_address=ALICE, amount=FUNDS, model_id=MODEL, price=PRICE)
        if age_s:
            s.execute(text("UPDATE jobs SET created_at = now() - make_interval(secs => :a) WHERE id = :j"),
                      {"a": age_s, "j": job_id})


def write_job(r: redis.Redis, job_id: str, *, status: str = "running", step: int = 0,
              started: float | None = None) -> None:
    """A job hash as submit_job + start_job write it; ``started`` dates its creation and its grant."""
    started = time.time() if started is None else started
    sampling = Sampling(max_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=1, stop=(), stop_ids=(2,),
                        prompt_len=len(PROMPT))
    fields: dict[str, Any] = {
        "status": status, "user_id": ALICE, "model_id": MODEL, "prompt_ids": json.dumps(PROMPT),
        "gen": json.dumps(sampling.to_dict()), "created": str(started), "updated": str(started),
        "step": str(step)}
    if status != "queued":
        for hop in ROUTE:
            r.set(keys.identity(hop.worker_id), "ab" * 32)
        grant, sig = jobs.make_grant(r, job_id, MODEL, ROUTE, sampling, now=started)
        fields |= {"route": json.dumps([h.to_list() for h in ROUTE]), "grant": grant, "grant_sig": sig,
                   "epoch": "0"}
    r.hset(keys.job(job_id), mapping=fields)
    r.zadd(keys.ACTIVE_JOBS, {job_id: started})


def finish(r: redis.Redis, job_id: str, *, tokens: int) -> None:
    """End the job as the collector does after ``tokens`` published tokens (the settle task is then lost)."""
    write_job(r, job_id, step=tokens)
    job = jobs.job_fields(r.hgetall(keys.job(job_id)))  # type: ignore[arg-type]
    pipe = r.pipeline()
    jobs.close(pipe, job_id, status="done", reason="stop", usage=jobs.usage_of(job))
    pipe.execute()


def expected(tokens: int) -> economics.Settlement:
    usage = jobs.route_usage(ROUTE, prompt_tokens=len(PROMPT), completion_tokens=tokens)["workers"]
    return economics.split_charge(usage, PRICE, cap=FUNDS)


def books(engine: Engine) -> dict[str, Any]:
    """Every balance, every hold and the number of journal transactions: what a no-op run must not change."""
    with session_scope(engine) as s:
        balances = dict(s.execute(text("SELECT kind || ':' || owner, balance FROM accounts")).all())
        holds = {h.id: (h.status, h.charged) for h in s.execute(select(Hold)).scalars()}
        txns = s.execute(select(func.count()).select_from(JournalTransaction)).scalar_one()
    return {"balances": balances, "holds": holds, "txns": txns}


def balance_of(engine: Engine, kind: str, owner: str = "") -> int:
    with session_scope(engine) as s:
        row = s.execute(text("SELECT balance FROM accounts WHERE kind = :k AND owner = :o"),
                        {"k": kind, "o": owner}).scalar_one_or_none()
    return int(row or 0)


def hold_of(engine: Engine, job_id: str) -> tuple[str, int | None]:
    with session_scope(engine) as s:
        h = s.execute(select(Hold).where(Hold.id == job_id)).scalar_one()
        return h.status, h.charged


def run(r: redis.Redis, engine: Engine, billing: LedgerBilling, **kw: Any) -> ReconcileReport:
    return reconcile(r, engine, billing, dispatch=Recording(None), **kw)


def assert_second_run_changes_nothing(r: redis.Redis, engine: Engine, billing: LedgerBilling) -> None:
    before, job_keys = books(engine), {k: r.dump(k) for k in r.scan_iter("azu:job:*")}
    again = run(r, engine, billing)
    assert (again.settled, again.released, again.ended, again.errors) == ([], [], [], [])
    assert books(engine) == before
    assert {k: r.dump(k) for k in r.scan_iter("azu:job:*")} == job_keys


def check_charged(engine: Engine, job_id: str, tokens: int) -> None:
    split = expected(tokens)
    assert split.charge > 0
    assert hold_of(engine, job_id) == ("settled", split.charge)
    assert balance_of(engine, "user", ALICE) == FUNDS - split.charge
    assert balance_of(engine, "platform") == split.platform
    for worker, credit in split.workers.items():
        assert balance_of(engine, "worker", worker) == credit
    settles = select(func.count()).select_from(JournalTransaction).where(
        JournalTransaction.idempotency_key == f"job:{job_id}:settle")
    with session_scope(engine) as s:
        assert s.execute(settles).scalar_one() == 1


# --- the tests ---------------------------------------------------------------------------------------------
def test_a_hold_whose_job_redis_forgot_is_released_in_one_run(r: redis.Redis, engine: Engine,
                                                               billing: LedgerBilling) -> None:
    hold(engine, "forgot", age_s=300)
    write_job(r, "forgot", step=7, started=time.time() - 300)
    r.delete(keys.job("forgot"), keys.events("forgot"))  # Redis forgot the job (a restart, a flush)

    report = run(r, engine, billing)

    assert report.released == ["forgot"] and report.settled == [] and report.errors == []
    assert hold_of(engine, "forgot") == ("released", 0)
    assert balance_of(engine, "user", ALICE) == FUNDS
    assert balance_of(engine, "worker", "w-a") == balance_of(engine, "worker", "w-b") == 0
    # The tombstone: no submit can take the id any more (it claims it with the same HSETNX)...
    assert not r.hsetnx(keys.job("forgot"), "status", "queued")
    assert jobs.get_job(r, "forgot") is None
    assert r.hget(keys.job("forgot"), "error") == FORGOTTEN.encode()
    # ...and the settle task, arriving late, changes nothing.
    assert jobs.bill_ended_job(r, "forgot", billing=billing) == "already settled"
    assert_second_run_changes_nothing(r, engine, billing)


def test_a_hold_placed_moments_ago_without_a_job_yet_is_left(r: redis.Redis, engine: Engine,
                                                             billing: LedgerBilling) -> None:
    hold(engine, "young")  # the API holds first, then writes the job: this is that window

    report = run(r, engine, billing)

    assert report.left == 1 and report.released == []
    assert hold_of(engine, "young") == ("held", None)
    assert not r.exists(keys.job("young"))  # no tombstone: the submit can still go ahead
    # Once it is older than the grace, it is released.
    report = run(r, engine, billing, grace_s=0.001)
    assert report.released == ["young"]
    assert balance_of(engine, "user", ALICE) == FUNDS


def test_an_ended_job_whose_settle_was_lost_is_charged_once(r: redis.Redis, engine: Engine,
                                                            billing: LedgerBilling) -> None:
    hold(engine, "lost")
    finish(r, "lost", tokens=5)

    report = run(r, engine, billing)

    assert report.settled == ["lost"] and report.ended == [] and report.errors == []
    check_charged(engine, "lost", tokens=5)
    assert jobs.bill_ended_job(r, "lost", billing=billing) == "already settled"  # the settle, late
    check_charged(engine, "lost", tokens=5)
    assert_second_run_changes_nothing(r, engine, billing)


def test_settle_and_reconcile_racing_charge_exactly_once(r: redis.Redis, engine: Engine,
                                                         billing: LedgerBilling,
                                                         redis_server: RedisServer) -> None:
    hold(engine, "race")
    finish(r, "race", tokens=9)
    n = 8
    barrier = threading.Barrier(2 * n, timeout=60)

    def settle(_: int) -> str:
        client = redis_server.client()  # a connection per thread, as separate processes would have
        barrier.wait()
        return jobs.bill_ended_job(client, "race", billing=billing)

    def reconciler(_: int) -> str:
        client = redis_server.client()
        barrier.wait()
        got = reconcile(client, engine, billing, dispatch=Recording(None))
        return "skipped" if got.skipped else "settled" if got.settled else "nothing"

    with ThreadPoolExecutor(max_workers=2 * n) as pool:
        settles = [pool.submit(settle, i) for i in range(n)]
        runs = [pool.submit(reconciler, i) for i in range(n)]
        outcomes = Counter(f.result() for f in settles)
        run_outcomes = Counter(f.result() for f in runs)

    # Every caller saw success or "already settled"; the ledger moved the money once.
    assert set(outcomes) <= {"settled", "already settled"}
    assert set(run_outcomes) <= {"settled", "nothing", "skipped"}
    check_charged(engine, "race", tokens=9)
    assert_second_run_changes_nothing(r, engine, billing)


def test_a_running_job_within_its_deadline_is_left_alone(r: redis.Redis, engine: Engine,
                                                         billing: LedgerBilling) -> None:
    hold(engine, "busy", age_s=120)
    write_job(r, "busy", step=3, started=time.time() - 120)
    job_before = r.hgetall(keys.job("busy"))
    books_before = books(engine)

    report = run(r, engine, billing)

    assert report.left == 1 and (report.settled, report.released, report.ended) == ([], [], [])
    assert r.hgetall(keys.job("busy")) == job_before
    assert books(engine) == books_before
    assert hold_of(engine, "busy") == ("held", None)


def test_a_job_stuck_past_its_deadline_is_ended_and_charged_its_published_steps(
        r: redis.Redis, engine: Engine, billing: LedgerBilling) -> None:
    hold(engine, "stuck", age_s=4000)
    write_job(r, "stuck", step=4, started=time.time() - 4000)  # its grant expired long ago
    recorder = Recording(None)

    report = reconcile(r, engine, billing, dispatch=recorder)

    assert report.ended == ["stuck"] and report.settled == ["stuck"]
    check_charged(engine, "stuck", tokens=4)  # the 4 tokens the core published, nothing more
    end = jobs.signed_end(jobs.job_fields(r.hgetall(keys.job("stuck"))) | {
        "end_sig": r.hget(keys.job("stuck"), "end_sig")})
    assert end is not None and end["status"] == "failed" and end["usage"]["completion_tokens"] == 4
    assert jobs.get_job(r, "stuck").status == "failed"  # type: ignore[union-attr]
    # Both hops told to free the job's caches: the core's signed order, in each one's inbox.
    for hop in ROUTE:
        (order,) = [unpack_inbox(blob) for blob in r.lrange(keys.pending(hop.worker_id), 0, -1)]
        assert isinstance(order, EndOrder) and order.job_id == "stuck"
        auth.check(auth.core_public_key(), auth.END_ORDER, end_order_part("stuck", order.epoch), order.sig,
                   what="the end order")
    assert_second_run_changes_nothing(r, engine, billing)


def test_a_queued_job_never_started_past_its_deadline_is_released(r: redis.Redis, engine: Engine,
                                                                  billing: LedgerBilling) -> None:
    hold(engine, "waited", age_s=4000)
    write_job(r, "waited", status="queued", started=time.time() - 4000)

    report = run(r, engine, billing)

    assert report.ended == ["waited"] and report.released == ["waited"]
    assert hold_of(engine, "waited") == ("released", 0)
    assert balance_of(engine, "user", ALICE) == FUNDS
    assert_second_run_changes_nothing(r, engine, billing)


def test_a_settled_mark_without_a_settlement_in_the_ledger_is_billed(r: redis.Redis, engine: Engine,
                                                                     billing: LedgerBilling) -> None:
    hold(engine, "marked")
    finish(r, "marked", tokens=2)
    r.hset(keys.job("marked"), "settled", "settled")  # a scheduler without the ledger marked it

    report = run(r, engine, billing)

    assert report.settled == ["marked"]
    check_charged(engine, "marked", tokens=2)


def test_an_unreachable_redis_releases_nothing(engine: Engine, billing: LedgerBilling,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    hold(engine, "dark", age_s=4000)
    nobody = redis.Redis(port=_free_port(), socket_connect_timeout=1)

    with pytest.raises(redis.ConnectionError):
        reconcile(nobody, engine, billing, dispatch=Recording(None))

    assert hold_of(engine, "dark") == ("held", None)
    with session_scope(engine) as s:  # and the run's lock went with it
        held = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())")
        assert s.execute(held).scalar_one() == 0
    with session_scope(engine) as s:  # give the hold back so the books close
        service.release_hold(s, job_id="dark")


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_a_redis_restart_with_aof_keeps_what_the_bill_needs(
        aof: bool, engine: Engine, billing: LedgerBilling, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With AOF (the core's setting), an ended job whose settle was lost is still charged after a restart;
    without persistence the same job is forgotten and its hold released whole (the user never pays for
    what the core can no longer prove)."""
    monkeypatch.setenv("AUTH_SECRET_KEY", CORE_SEED)
    server = RedisServer(tmp_path, aof=aof)
    try:
        r = server.client()
        hold(engine, "restart", age_s=300)
        finish(r, "restart", tokens=6)
        server.restart()
        r = server.client()

        report = run(r, engine, billing)

        if aof:
            assert report.settled == ["restart"]
            check_charged(engine, "restart", tokens=6)
        else:
            assert report.released == ["restart"]
            assert hold_of(engine, "restart") == ("released", 0)
            assert balance_of(engine, "user", ALICE) == FUNDS
    finally:
        server.stop()
