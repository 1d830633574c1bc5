"""A worker's hand-overs (azu.network.inbox.Outbox), against the real Redis: in place while sends are quick,
on a thread of their own once they are slow (a far Redis); in the order they were handed in either way; a
failed queued send fails the worker's next drain, once."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from azu.network import keys
from azu.network.inbox import Outbox

pytestmark = [pytest.mark.network]


def _far() -> Outbox:
    box = Outbox(background=True)
    box.send_s = 1.0  # as measured against a Redis a second away: sends go to the thread
    return box


def test_queued_sends_go_out_in_order_and_drain_waits_for_them(r: redis.Redis) -> None:
    key = "azu:test:outbox"
    r.delete(key)
    box = _far()
    for i in range(200):
        box.submit(lambda i=i: r.rpush(key, i))
    box.drain()
    assert [int(v) for v in r.lrange(key, 0, -1)] == list(range(200))
    r.delete(key)


def test_a_failed_queued_send_fails_the_next_drain_once_and_the_rest_still_go(r: redis.Redis) -> None:
    key = "azu:test:outbox-errors"
    r.delete(key)
    box = _far()
    box.submit(lambda: r.rpush(key, "a"))
    box.submit(lambda: r.execute_command("NO-SUCH-COMMAND"))
    box.submit(lambda: r.rpush(key, "b"))
    with pytest.raises(redis.ResponseError):
        box.drain()
    box.drain()  # reported once
    assert r.lrange(key, 0, -1) == [b"a", b"b"]
    r.delete(key)


def test_quick_sends_run_in_place_and_slow_ones_move_to_the_thread() -> None:
    threads: list[str] = []
    box = Outbox(background=True)
    box.submit(lambda: threads.append(threading.current_thread().name))
    assert threads == [threading.current_thread().name]  # next to Redis: no hand-off to another thread
    for _ in range(5):  # a far Redis: each send takes 10 ms
        box.submit(lambda: (time.sleep(0.01), threads.append(threading.current_thread().name)))
    box.drain()
    assert threads[-1] == "azu-outbox"
    with pytest.raises(ZeroDivisionError):  # in place, an error is the caller's at once
        Outbox(background=False).submit(lambda: 1 // 0)


def test_commitments_of_a_failed_hand_over_go_out_with_the_next_flush(r: redis.Redis) -> None:
    """A hand-over that fails gives its commitments back: lost, they would make the verifier find a live,
    honest worker that did not commit."""
    from azu.network.node import WorkerNode

    base = "azu:test:outbox-reports"
    reports = keys.reports_from("ob1", base)  # its own list under the test's base
    r.delete(reports, keys.report_hints(base))
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
    node = WorkerNode(dead, worker_id="ob1", dispatch=None, linger_s=0, reports_base=base)  # type: ignore[arg-type]
    node._unsent_commits = [b"chunk-0", b"chunk-1"]
    with pytest.raises(redis.ConnectionError):
        node._hand_over([])
    assert node._unsent_commits == [b"chunk-0", b"chunk-1"]
    node.r = r
    node._flush_commits([b"final"])
    assert r.lrange(reports, 0, -1) == [b"chunk-0", b"chunk-1", b"final"]
    assert r.lrange(keys.report_hints(base), 0, -1) == [b"ob1"]  # the collector is told where to look
    r.delete(reports, keys.report_hints(base))


def test_reports_queued_behind_a_slow_round_trip_go_out_together_in_order(r: redis.Redis) -> None:
    """A far Redis (every round trip 50 ms) and hand-overs that all went directly: the reports of 40 of them
    do not take 40 round trips one after the other; each send takes all that wait, tokens in order and
    ahead of commitments (the collector publishes a token only once it reaches it)."""
    from azu.network.node import WorkerNode

    base = "azu:test:outbox-coalesce"
    reports = keys.reports_from("ob2", base)  # its own list under the test's base
    r.delete(reports, keys.report_hints(base))
    own = redis.Redis(connection_pool=redis.ConnectionPool(**r.connection_pool.connection_kwargs))
    node = WorkerNode(own, worker_id="ob2", dispatch=None, linger_s=0, reports_base=base,  # type: ignore[arg-type]
                      background_sends=True)
    node.outbox.send_s = 1.0  # measured far: sends go to the outbox's thread
    node._control_asked = time.monotonic() + 3600  # no control-queue look in these pipes
    pipes = 0
    real_pipeline = own.pipeline  # this node's own client: the slow round trips stay in this test

    def slow_pipeline(*args, **kwargs):
        nonlocal pipes
        pipes += 1
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute

        def slow_execute(*a, **k):
            time.sleep(0.05)
            return execute(*a, **k)

        pipe.execute = slow_execute
        return pipe

    own.pipeline = slow_pipeline  # type: ignore[method-assign]
    node._unsent_commits = [b"chunk-0"]  # a commitment from before: tokens go ahead of it
    started = time.monotonic()
    for i in range(40):
        node._hand_over([], reports=[b"token-%d" % i])
        time.sleep(0.005)  # a hand-over every 5 ms: ten per round trip
    node.outbox.drain()
    node._flush_commits()
    sent = r.lrange(reports, 0, -1)
    assert [v for v in sent if v.startswith(b"token")] == [b"token-%d" % i for i in range(40)]
    assert sent.index(b"token-0") < sent.index(b"chunk-0") and len(sent) == 41
    assert pipes <= 8, pipes
    assert time.monotonic() - started < 1.0  # 40 round trips one after the other: 2 s
    r.delete(reports, keys.report_hints(base))
    own.close()


def test_a_failed_flush_keeps_the_reports_for_the_next_send(r: redis.Redis) -> None:
    from azu.network.node import WorkerNode

    base = "azu:test:outbox-flush"
    reports = keys.reports_from("ob3", base)  # its own list under the test's base
    r.delete(reports, keys.report_hints(base))
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
    node = WorkerNode(dead, worker_id="ob3", dispatch=None, linger_s=0, reports_base=base)  # type: ignore[arg-type]
    node._unsent_tokens, node._unsent_commits = [b"token-7"], [b"chunk-0"]
    with pytest.raises(redis.ConnectionError):
        node._flush_commits([b"final"])
    assert (node._unsent_tokens, node._unsent_commits) == ([b"token-7"], [b"chunk-0", b"final"])
    node.r = r
    node._flush_commits()
    assert r.lrange(reports, 0, -1) == [b"token-7", b"chunk-0", b"final"]
    r.delete(reports, keys.report_hints(base))
