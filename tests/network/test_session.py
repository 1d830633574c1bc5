"""An idle worker's session, against the real Redis: it lingers on its inbox (``linger_s``), taking what comes
in the same session (no Celery message wakes it), then lets go of its wake key; it ends at once when the
worker is stopping or a control message waits. The same on worker processes: tests/network/test_pipeline.py.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import redis

from azu.network import keys
from azu.network.dispatch import control_queue
from azu.network.inbox import WAKE_TTL_S
from azu.network.node import WAIT_SLICE_S, WorkerNode
from tests.support.network import Recording

pytestmark = [pytest.mark.network]


def _node(r: redis.Redis, worker_id: str, linger_s: float) -> tuple[WorkerNode, Recording]:
    base = f"azu:test:{worker_id}"
    r.delete(keys.pending(worker_id), keys.wake(worker_id), control_queue(worker_id),
             keys.reports_from(worker_id, base), keys.report_hints(base))
    sent = Recording(None)
    node = WorkerNode(r, worker_id=worker_id, dispatch=sent, linger_s=linger_s, session_s=0.3,
                      reports_base=base)
    r.set(keys.wake(worker_id), "1", ex=WAKE_TTL_S)  # as a sender sets it before the message that wakes
    return node, sent


def _session(node: WorkerNode) -> tuple[threading.Thread, list[float]]:
    took: list[float] = []

    def run() -> None:
        started = time.monotonic()
        node.process_pending([])
        took.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def test_an_idle_session_lingers_then_lets_go_of_its_wake_key(r: redis.Redis) -> None:
    node, sent = _node(r, "s-linger", linger_s=1.5)
    thread, took = _session(node)
    time.sleep(1.0)
    assert thread.is_alive() and r.exists(keys.wake("s-linger"))  # awake: senders need not wake it
    # A stranger's bytes on the list while it lingers are taken in this session (and refused there).
    r.rpush(keys.pending("s-linger"), b"not a bundle")
    thread.join(timeout=10)
    assert not thread.is_alive() and 1.5 <= took[0] < 1.5 + 1.0 + 2 * WAIT_SLICE_S
    assert r.llen(keys.pending("s-linger")) == 0 and not r.exists(keys.wake("s-linger"))
    assert sent.sent == []  # it never woke itself by message


def test_a_lingering_session_makes_one_round_trip_a_slice(r: redis.Redis, monkeypatch) -> None:
    """Idle, a session's wait and its look at the control queue go out together: a look of its own was a
    second round trip each slice, during which no pop waited on the list, and between distant hosts a step
    that came then waited for it (bench/latency.py ``--idle-pairs``)."""
    node, _ = _node(r, "s-trips", linger_s=60.0)
    sends: list[bytes] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "s-trips-session":
            sends.append(b"".join(command) if isinstance(command, list) else command)
        return real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    thread = threading.Thread(target=node.process_pending, args=([],), name="s-trips-session")
    thread.start()
    time.sleep(4 * WAIT_SLICE_S)
    node.end_sessions()
    thread.join(timeout=10)
    assert not thread.is_alive()
    # The last three: its release (WATCH the list, look at it, MULTI/DEL the wake key/EXEC).
    idle, release = sends[:-3], sends[-3:]
    assert len(idle) >= 3
    # Every round trip a pop, the look behind it (a look of its own, before: a second round trip a slice).
    assert all(b"BLMPOP" in s and b"LLEN" in s and b"EXPIRE" in s for s in idle), idle
    assert [b"WATCH" in release[0], b"LLEN" in release[1], b"EXEC" in release[2]] == [True] * 3, release


@pytest.mark.parametrize("how", ["stopping", "control message"])
def test_a_lingering_session_ends_soon_when_stopping_or_a_control_message_waits(r: redis.Redis,
                                                                                how: str) -> None:
    node, _ = _node(r, f"s-end-{how[0]}", linger_s=60.0)
    thread, took = _session(node)
    time.sleep(0.5)
    assert thread.is_alive()
    if how == "stopping":
        node.end_sessions()  # Celery's warm shutdown (workers/stage.py)
    else:
        r.rpush(control_queue(node.worker_id), b"a load order, say")
    thread.join(timeout=10)
    assert not thread.is_alive() and took[0] < 0.5 + 2 * WAIT_SLICE_S + 0.5
    assert not r.exists(keys.wake(node.worker_id))
    r.delete(control_queue(node.worker_id))


def test_a_stopping_session_ends_though_steps_keep_coming(r: redis.Redis) -> None:
    """Told to stop, a session takes nothing new: what comes goes back to its list by a message to itself
    (the wake key kept), and Celery's warm shutdown is not held up by a steady trickle."""
    node, sent = _node(r, "s-trickle", linger_s=60.0)
    thread, took = _session(node)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            r.rpush(keys.pending("s-trickle"), b"not a bundle")

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        time.sleep(0.5)
        node.end_sessions()
        thread.join(timeout=10)
    finally:
        stop.set()
        feeder.join()
    assert not thread.is_alive() and took[0] < 0.5 + 2 * WAIT_SLICE_S + 0.5
    left = r.llen(keys.pending("s-trickle")) + sum(len(kw.get("payloads") or []) for _, _, kw in sent.sent)
    assert left == 0 or r.exists(keys.wake("s-trickle")) or sent.sent  # nothing stranded without a reader
    r.delete(keys.pending("s-trickle"), keys.wake("s-trickle"))


def test_an_idle_session_sends_the_reports_it_holds_as_it_turns_idle(r: redis.Redis) -> None:
    """A job's last commitments wait for the next hand-over or the session's end: they go out as the session
    turns idle, not 10 s later when its linger is over (the verifier waits for them)."""
    node, _ = _node(r, "s-flush", linger_s=30.0)
    node._unsent_commits = [b"the last chunk of a job's commitments"]
    thread, _ = _session(node)
    time.sleep(1.0)
    assert thread.is_alive()
    assert r.lrange(keys.reports_from("s-flush", "azu:test:s-flush"), 0, -1) == [
        b"the last chunk of a job's commitments"]
    node.end_sessions()
    thread.join(timeout=10)
    r.delete(keys.reports_from("s-flush", "azu:test:s-flush"), keys.report_hints("azu:test:s-flush"))


def test_an_idle_session_moves_its_stages_weights_back_to_one_users_layout(r: redis.Redis,
                                                                          monkeypatch) -> None:
    """A run of batches moved a stage's weights to its batch layout (azu.engine.kernels.LayoutSwitch); idle,
    the session moves them back, a step's worth at a time with short waits between, so the next lone user
    finds one user's layout. A real LayoutSwitch on real blocked linears; the stage around it is only the
    method the session calls (a whole Stage adds nothing here)."""
    import torch
    from torch import nn

    from azu.engine import kernels

    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1)  # a block a move: 4 + 1 moves
    monkeypatch.setattr(kernels, "SWITCH_BACK_IDLE_S", 0.3)  # idle this long since the last step first
    model = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8))
    reference = copy.deepcopy(model)
    plan = kernels.KernelPlan(layout="loaded", onednn_rows=frozenset(), pad_to={}, batch_layout="transposed")
    kernels.apply_plan(model, plan, lambda _rows: None)
    switch = kernels.LayoutSwitch(model, plan, lambda _rows: None)
    for _ in range(kernels.SWITCH_AFTER_STEPS + 8):
        switch.after_step(8)
    assert switch.layout == "transposed" and switch.settled

    moves: list[float] = []

    class Held:
        def move_layouts_when_idle(self) -> bool:
            moves.append(time.monotonic())
            return switch.move_when_idle()

    node, _ = _node(r, "s-moves", linger_s=3.0)
    node.stages[("m", None)] = Held()  # type: ignore[index]
    thread, _took = _session(node)
    time.sleep(2 * WAIT_SLICE_S + 0.5)
    assert thread.is_alive() and switch.layout == "loaded" and switch.settled  # still lingering: moved back
    assert {type(m) for m in model} == {kernels.RowsLinear}
    # The moves after the first came 10 ms apart, not a wait slice apart.
    assert len(moves) >= 5 and moves[4] - moves[0] < WAIT_SLICE_S
    x = torch.randn(2, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
    node.end_sessions()
    thread.join(timeout=10)
    assert not thread.is_alive()
