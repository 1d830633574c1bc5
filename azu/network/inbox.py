"""A worker's inbox: how step payloads reach a worker, and how the worker takes them.

Two Redis keys per worker (azu.network.keys): ``pending`` (a list of packed step payloads) and ``wake`` (set
while the worker has been woken and has not yet taken all that is pending).

Sending (``deliver``), with writes only (a worker may not read another worker's keys, and a script that
declares keys needs read access to them): RPUSH the signed bundle onto ``pending`` and refresh its expiry,
then ``SET wake NX``; if that SET succeeded the worker was idle, so the sender wakes it with one Celery
message (the worker then takes its inbox). This is race-free against the taker's release (``release``:
LLEN == 0, then DEL wake, atomically under WATCH): a push that lands before the release keeps the worker
taking, and one that lands after it finds ``wake`` cleared and wakes the worker. One Redis round trip for
every batch of steps, whatever the number of workers it goes to.

Taking (``Inbox``): a woken worker takes everything pending as its next batch, so the decode steps of many
jobs run together; it releases ``wake`` only when ``pending`` is empty, in one atomic step, so a payload is
never left on a list nobody will read.

A worker with a direct path (azu.network.direct) has a second source: ``LocalFrames``, the hand-overs its
listener received. Its inbox then waits on both at once: a blocking pop sent on a connection of its own and
left outstanding (``_BlockingPop``), and the frames' wake-up pipe, in one ``select``; a frame ends the wait
at once and the pop stays outstanding for the next one (its answer is read whenever it comes, so nothing it
took is lost). Before the worker releases ``wake`` it reads the outstanding pop's answer (``settle``): a pop
still outstanding after the release could take a payload whose sender found ``wake`` set and woke nobody.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import redis

from azu.network import keys
from azu.network.dispatch import Dispatcher, send_forward

log = logging.getLogger(__name__)

WAKE_TTL_S = 30  # a worker that died holding its wake key is woken again after this at the latest
PENDING_TTL_S = 3600
BATCH_MAX = 4096  # payloads taken from the list at once
TAKE_POP_S = 0.05  # the server-side timeout of a pop a take leaves outstanding (settle waits for it at most)
# The shortest blocking pop: Redis before 7.0.8 (azu up's 6.2 too) reads a timeout under 1 ms as 0, which
# blocks for ever (redis/redis#11688), and 0 itself means for ever on every version.
MIN_BLOCK_S = 0.01

def deliver(pipe: redis.client.Pipeline, bundles: Mapping[str, bytes], *, dispatch: Dispatcher,
            before: int | None = None) -> list[Any]:
    """Hand ``bundles`` (worker id -> one packed, signed ``StepBundle``, or the core's ``EndOrder``) over,
    then wake each idle worker. A write Redis refused is logged (its steps are the watchdog's to recover; a
    lost end order leaves the caches to the worker's idle sweep).

    ``pipe`` may already carry the caller's own writes: they go in the same round trip, before the hand-over.
    Returns the answers to those earlier writes.
    """
    before = len(pipe) if before is None else before
    order = list(bundles)
    for worker_id in order:
        pipe.rpush(keys.pending(worker_id), bundles[worker_id])
        pipe.expire(keys.pending(worker_id), PENDING_TTL_S)
        pipe.set(keys.wake(worker_id), "1", nx=True, ex=WAKE_TTL_S)
    answers = pipe.execute(raise_on_error=False)
    for worker_id, pushed in zip(order, answers[before::3], strict=True):
        if isinstance(pushed, Exception):
            log.warning("hand-over to worker %s not written: %s", worker_id, pushed)
    for worker_id, woke in zip(order, answers[before + 2::3], strict=True):
        if woke is True:
            send_forward(worker_id, [], dispatch=dispatch)
    return answers[:before]


def look_at_control(pipe: redis.client.Pipeline, control_queue: str, worker_id: str) -> None:
    """Queue on ``pipe``: the length of the worker's control queue (the first answer), and another
    ``WAKE_TTL_S`` for its wake key (the worker is still taking)."""
    for command in _look_commands(control_queue, worker_id):
        pipe.execute_command(*command)


def _look_commands(control_queue: str, worker_id: str) -> list[tuple[Any, ...]]:
    """``look_at_control``'s commands, for a pipeline or a connection of their own (``_BlockingPop``)."""
    return [("LLEN", control_queue), ("EXPIRE", keys.wake(worker_id), WAKE_TTL_S)]


def control_found(answer: Any) -> bool:
    """Whether the answer to a look's ``LLEN`` says a control message waits; an error says it cannot be
    told, which counts as waiting (the session ends, and the message gets its turn)."""
    return answer > 0 if isinstance(answer, int) else True


def pop_all(r: redis.Redis, key: str, timeout_s: float, *, has_blmpop: bool | None,
            count: int = BATCH_MAX, control: tuple[str, str] | None = None,
            ) -> tuple[list[bytes], bool, bool | None]:
    """Wait up to ``timeout_s`` for ``key``'s first item; return all queued (at most ``count``), whether the
    server has BLMPOP (found out by trying it once: ``INFO`` is not for workers), and, with ``control``
    (``(control queue, worker id)``), whether a message waits on that Celery list, else None.

    The look at the control queue (``look_at_control``) rides in the same round trip, queued behind the
    pop: Redis runs it when the pop returns, so it is as fresh as a look of its own after the wait, without
    the round trip between the two during which no pop waits on the list (between distant hosts a step that
    came then waited for it: bench/latency.py ``--idle-pairs``)."""
    timeout_s = max(timeout_s, MIN_BLOCK_S)
    if has_blmpop is not False:
        # BLMPOP (Redis 7) answers at once with all that is queued (up to the count), or waits for one.
        got, waiting = _pop_then_look(r, control, "BLMPOP", timeout_s, 1, key, "LEFT", "COUNT", count)
        if not isinstance(got, redis.ResponseError):
            return (list(got[1]) if got else []), True, waiting
        if "unknown command" not in str(got).lower():
            raise got
    # Older servers: BLPOP waits for the first, then take the rest in one go.
    first, waiting = _pop_then_look(r, control, "BLPOP", key, timeout_s)
    if isinstance(first, Exception):
        raise first
    if not first:
        return [], False, waiting
    return with_the_rest(r, key, first[1], count), False, waiting


def _pop_then_look(r: redis.Redis, control: tuple[str, str] | None, *pop: Any) -> tuple[Any, bool | None]:
    """The pop's answer (an error as a value), and with ``control`` the control queue's look behind it."""
    if control is None:
        try:
            return r.execute_command(*pop), None
        except redis.ResponseError as exc:
            return exc, None
    pipe = r.pipeline(transaction=False)
    pipe.execute_command(*pop)
    look_at_control(pipe, control[0], control[1])
    got, waiting, _ = pipe.execute(raise_on_error=False)
    return got, control_found(waiting)


def with_the_rest(r: redis.Redis, key: str, first: bytes, count: int = BATCH_MAX) -> list[bytes]:
    """``first`` (a BLPOP just took it from ``key``) and up to ``count - 1`` more, taken in one go. If that
    read fails, ``first`` goes back to the head of the list for the next pop."""
    pipe = r.pipeline()
    pipe.lrange(key, 0, count - 2)
    pipe.ltrim(key, count - 1, -1)
    try:
        rest = pipe.execute()[0]
    except redis.RedisError:
        with contextlib.suppress(redis.RedisError):
            r.lpush(key, first)
        raise
    return [first, *rest]


class LocalFrames:
    """Hand-overs that came over the direct path, queued for the worker's session (the listener's threads
    put, the session takes); a byte on a pipe wakes a session waiting in ``Inbox.wait``.

    At most ``max_bytes`` wait (``room`` blocks the listener's thread until the session takes some: that
    connection stops being read, its sender's send times out and goes through Redis)."""

    MAX_BYTES = 256 << 20

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._taken = threading.Condition()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def room(self, size: int, timeout_s: float = 60.0) -> bool:
        """Wait (up to ``timeout_s``) until ``size`` more bytes fit; False if they did not in time."""
        with self._taken:
            return self._taken.wait_for(lambda: not self._items or self._bytes + size <= self.max_bytes,
                                        timeout_s)

    def put(self, blob: bytes) -> None:
        with self._taken:
            self._items.append(blob)
            self._bytes += len(blob)
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already: the waiter looks
            os.write(self._write, b"\0")

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> list[bytes]:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        with self._taken:
            out = list(self._items)
            self._items.clear()
            self._bytes = 0
            self._taken.notify_all()
        return out


class _BlockingPop:
    """A BLMPOP (BLPOP before Redis 7) on a connection of its own, which may be left outstanding while the
    worker does something else, and whose answer is read when it comes; optionally with a look at the
    control queue behind it (``pop_all``)."""

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r = r
        self.key = key
        self.conn: Any = None
        self.outstanding = False
        self.has_blmpop: bool | None = None
        self._blmpop = True  # which the outstanding one is
        self.looks = 0  # answers behind the pop's: a look at the control queue (2) or none (0)
        self.control_waiting: bool | None = None  # what the last look behind a pop found

    def start(self, timeout_s: float, control: tuple[str, str] | None = None) -> None:
        if self.outstanding:
            return
        if self.conn is None:
            self.conn = self.r.connection_pool.make_connection()
        timeout = max(MIN_BLOCK_S, round(timeout_s, 3))
        self._blmpop = self.has_blmpop is not False
        commands: list[tuple[Any, ...]] = [("BLMPOP", timeout, 1, self.key, "LEFT", "COUNT", BATCH_MAX)
                                           if self._blmpop else ("BLPOP", self.key, timeout)]
        if control is not None:
            commands += _look_commands(*control)
        self.looks = len(commands) - 1
        self.conn.send_packed_command(self.conn.pack_commands(commands))
        self.outstanding = True

    def fileno(self) -> int:
        return int(self.conn._sock.fileno())

    def answered(self) -> bool:
        return self.outstanding and bool(self.conn.can_read(0))

    def read(self) -> list[bytes]:
        """The outstanding pop's answer (waits for it)."""
        self.outstanding = False
        try:
            got: Any = self._answer()
            if self.looks:
                waiting = self._answer()
                self._answer()
                self.control_waiting = control_found(waiting)
        except Exception:
            self.conn.disconnect()  # what it had popped is lost with it: the watchdog replays those steps
            raise
        if isinstance(got, redis.ResponseError):
            if self._blmpop and "unknown command" in str(got).lower():
                self.has_blmpop = False
                return []
            raise got
        if not got:
            return []
        if self._blmpop:
            self.has_blmpop = True
            return list(got[1])
        return with_the_rest(self.r, self.key, got[1])

    def _answer(self) -> Any:
        """The next answer on the connection, an error reply as a value (the answers behind it still come)."""
        try:
            return self.conn.read_response()
        except redis.ResponseError as exc:
            return exc

    def close(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
        self.outstanding = False


class Inbox:
    """The taking side, for one worker (``local``: its direct path's frames, if it has one)."""

    def __init__(self, r: redis.Redis, worker_id: str, local: LocalFrames | None = None) -> None:
        self.r = r
        self.worker_id = worker_id
        self.pending = keys.pending(worker_id)
        self.wake = keys.wake(worker_id)
        self.local = local
        self._pop = _BlockingPop(r, self.pending) if local is not None else None
        self._has_blmpop: bool | None = None  # BLMPOP needs Redis >= 7; found out on first use
        # (when, whether) a wait last found a message on the worker's control queue (``wait``'s ``control``).
        self.control_seen: tuple[float, bool] = (-math.inf, False)

    def clear(self) -> None:
        """Forget what was left for an earlier process with this worker id (it held the caches they need)."""
        self.r.delete(self.pending, self.wake)

    def take(self) -> list[bytes]:
        """Everything pending now (the wake key stays set: senders keep queueing).

        With a direct path: the frames, and what the outstanding pop has answered, without a round trip (a
        pop is left outstanding for the next take). Between distant hosts a round trip to Redis per round
        would set the pace of a busy worker, whose hand-overs now come directly; what comes through Redis
        (the core's first steps, end orders) is a round later."""
        if self._pop is not None:
            got = self._local_and_popped()
            self._pop.start(TAKE_POP_S)
            return got
        # MULTI/EXEC, not a script: a worker's login may not run Lua (one busy loop would stall Redis for
        # every other client; docs/security.md). Keeps the wake key alive while the worker takes.
        pipe = self.r.pipeline(transaction=True)
        pipe.lrange(self.pending, 0, -1)
        pipe.delete(self.pending)
        pipe.expire(self.wake, WAKE_TTL_S)
        got, _, _ = pipe.execute()
        return list(got)

    def wait(self, timeout_s: float, *, control: str | None = None) -> list[bytes]:
        """Wait up to ``timeout_s`` for payloads; return all that are queued (at most ``BATCH_MAX``).

        ``control``: the worker's control queue, looked at in the same round trip when the wait ends (and
        the wake key kept): ``control_seen`` has the answer. An idle session waits in slices and looks at its
        control queue after each: a look of its own would be a second round trip a slice, during which no pop
        waits on the list."""
        look = (control, self.worker_id) if control is not None else None
        if self._pop is None:
            got, self._has_blmpop, waiting = pop_all(self.r, self.pending, timeout_s,
                                                     has_blmpop=self._has_blmpop, control=look)
            if waiting is not None:
                self.control_seen = (time.monotonic(), waiting)
            return got
        deadline = time.monotonic() + timeout_s
        while True:  # an empty answer of a pop left from an earlier wait does not end this one
            got = self._local_and_popped()
            left = deadline - time.monotonic()
            if got:
                return got
            if left <= 0:
                if look is not None and self._pop.outstanding and self._pop.looks:
                    # Started by this wait, with its timeout: its answer, the look behind it, is due now (a
                    # frame that comes first ends this too). A pop left from before carries no look: the
                    # session then looks on its own.
                    self._wait_either(1.0)
                    return self._local_and_popped()
                return got
            self._pop.start(left, look)
            self._wait_either(left)

    def settle(self) -> list[bytes]:
        """Before ``release``: wait for the outstanding pop's answer (or a direct frame, which comes first)
        and return what either brought."""
        if self._pop is None or self.local is None:  # both or neither
            return []
        while self._pop.outstanding and not len(self.local):
            self._wait_either(1.0)
            if self._pop.answered():
                return self._read_pop() + self.local.take()
        return self._local_and_popped()

    def _wait_either(self, timeout_s: float) -> None:
        """Until the outstanding pop's connection or the frames' pipe is readable, or ``timeout_s``."""
        assert self._pop is not None and self.local is not None
        poll = select.poll()  # not select(): a worker with many connections has descriptors past 1024
        poll.register(self._pop.fileno(), select.POLLIN)
        poll.register(self.local.fileno(), select.POLLIN)
        poll.poll(max(0, int(timeout_s * 1000)))

    def _local_and_popped(self) -> list[bytes]:
        got = self._read_pop() if self._pop is not None and self._pop.answered() else []
        return got + self.local.take() if self.local is not None else got

    def _read_pop(self) -> list[bytes]:
        assert self._pop is not None
        got = self._pop.read()
        if self._pop.control_waiting is not None:
            self.control_seen = (time.monotonic(), self._pop.control_waiting)
            self._pop.control_waiting = None
        return got

    def close(self) -> None:
        if self._pop is not None:
            self._pop.close()

    def keep_awake(self) -> None:
        """Keep the wake key for another ``WAKE_TTL_S``: the worker is about to wake itself by message."""
        self.r.expire(self.wake, WAKE_TTL_S)

    def control_waiting(self, control_queue: str) -> bool:
        """Whether a message waits on the worker's Celery list ``control_queue`` (True if that cannot be
        told); keeps the wake key for another ``WAKE_TTL_S`` meanwhile (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        look_at_control(pipe, control_queue, self.worker_id)
        try:
            waiting, _ = pipe.execute()
        except redis.RedisError:
            return True
        return bool(waiting)

    def release(self) -> bool:
        """Clear the wake key if nothing is pending; False if something arrived meanwhile (take it). Atomic
        by WATCH on the pending list: a push between the look and the DEL aborts the DEL, so a sender either
        lands before (the worker takes it) or finds the wake key cleared (and wakes the worker)."""
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.pending)
                if pipe.llen(self.pending):
                    return False
                pipe.multi()
                pipe.delete(self.wake)
                pipe.execute()
                return True
            except redis.WatchError:
                return False


class Outbox:
    """A worker's hand-overs, sent in order; on a thread of their own (``background``) when Redis is far,
    so that the worker runs its next batch while the last one travels.

    A hand-over waits for Redis's answer (whether the next worker must be woken). Between distant hosts that
    is a whole round trip, and a micro-batch that waited for the one before it to be answered would leave
    the pipeline half empty (bench/latency.py, 16 streams). Handing a send to another thread costs more
    than it saves when there is nothing to overlap it with (the worker's next move is to wait for its
    inbox anyway: one job in flight) or when Redis is next door (an answer in a fraction of a millisecond):
    then a send runs in place, as long as nothing is queued before it. ``overlap``: the caller has more to
    run now; sends count as slow from ``INLINE_S`` (a moving average of their time, in either thread).

    ``drain`` waits until everything submitted was sent and raises the first error a queued send met since
    the last drain; the worker drains before any write that must come after its hand-overs (the last
    commitments of a job, the end of a session). Without ``background`` every send runs in place
    (in-process test networks, which step their messages by hand).
    """

    INLINE_S = 0.002

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self.send_s = 0.0  # moving average of a send's time
        self._sends: queue.Queue[Callable[[], None]] = queue.Queue()
        self._queued = 0  # submitted to the thread and not yet sent
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, send: Callable[[], None], *, overlap: bool = True) -> None:
        with self._lock:
            in_place = not self.background or (
                (self.send_s < self.INLINE_S or not overlap) and not self._queued)
            if not in_place:
                self._queued += 1
                self._start_thread()
        if in_place:
            self._timed(send)
        else:
            self._sends.put(send)
            time.sleep(0)  # let go of the GIL: the send starts now, not when this thread next waits

    def drain(self) -> None:
        if not self.background:
            return
        with self._lock:  # a thread that died with sends queued would leave join() waiting forever
            if self._queued:
                self._start_thread()
        self._sends.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _start_thread(self) -> None:
        """Start the sending thread unless it runs (the caller holds ``_lock``)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="azu-outbox", daemon=True)
            self._thread.start()

    def _timed(self, send: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            send()
        finally:
            self.send_s = 0.8 * self.send_s + 0.2 * (time.perf_counter() - started)

    def _run(self) -> None:
        while True:
            send = self._sends.get()
            try:
                self._timed(send)
            except BaseException as exc:  # kept for the worker thread: its task fails, as a send there would
                log.warning("a hand-over failed: %s", exc)
                if self._error is None:
                    self._error = exc
            finally:
                with self._lock:
                    self._queued -= 1
                self._sends.task_done()
