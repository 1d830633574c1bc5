"""A worker's inbox: how step payloads reach a worker, and how the worker takes them.

Two Redis keys per worker (azu.network.keys): ``pending`` (a list of packed step payloads) and ``wake`` (set
while the worker has been woken and has not yet taken all that is pending).

Sending (``deliver``): if no wake-up is outstanding, the sender sets ``wake`` and sends one Celery message
carrying the payloads (an idle worker gets its work in the message that wakes it); otherwise the worker is
busy, or waiting on its list for more, and the payloads go on ``pending``. One Redis round trip for every
worker a batch of steps goes to.

Taking (``Inbox``): a woken worker runs what its message carried, then takes everything pending as its next
batch, so the decode steps of many jobs run together; it releases ``wake`` only when ``pending`` is empty, in
one atomic step, so a payload is never left on a list nobody will read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from azu.network import keys
from azu.network.dispatch import Dispatcher, send_forward

WAKE_TTL_S = 30  # a worker that died holding its wake key is woken again after this at the latest
PENDING_TTL_S = 3600
BATCH_MAX = 4096  # payloads taken from the list at once

# Hand payloads to a worker: 1 if the caller must wake it (with a message carrying them), else 0 (queued).
_HAND_OVER = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 1 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 0
"""
# Take every payload left for the worker (and keep its wake key alive while it works).
_TAKE = """
local v = redis.call('LRANGE', KEYS[1], 0, -1)
if #v > 0 then redis.call('DEL', KEYS[1]); redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return v
"""
# Stop taking: clear the wake key, but only if nothing is pending, in one atomic step (a sender that
# then finds the key cleared wakes the worker with a new Celery message).
_RELEASE = """
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]); return 1 end
return 0
"""


def deliver(pipe: redis.client.Pipeline, payloads: Mapping[str, Sequence[bytes]], *,
            dispatch: Dispatcher) -> None:
    """Hand ``payloads`` (worker id -> packed step payloads) over, then wake each idle worker.

    ``pipe`` may already carry the caller's own writes: they go in the same round trip, before the hand-over.
    """
    before = len(pipe)
    order = list(payloads)
    for worker_id in order:
        pipe.eval(_HAND_OVER, 2, keys.wake(worker_id), keys.pending(worker_id), WAKE_TTL_S, PENDING_TTL_S,
                  *payloads[worker_id])
    answers = pipe.execute()[before:]
    for worker_id, woke in zip(order, answers, strict=True):
        if woke:
            send_forward(worker_id, payloads[worker_id], dispatch=dispatch)


class Inbox:
    """The taking side, for one worker."""

    def __init__(self, r: redis.Redis, worker_id: str) -> None:
        self.r = r
        self.worker_id = worker_id
        self.pending = keys.pending(worker_id)
        self.wake = keys.wake(worker_id)
        self._has_blmpop: bool | None = None  # BLMPOP needs Redis >= 7; found out on first use

    def clear(self) -> None:
        """Forget what was left for an earlier process with this worker id (it held the caches they need)."""
        self.r.delete(self.pending, self.wake)

    def take(self) -> list[bytes]:
        """Everything pending now (the wake key stays set: senders keep queueing)."""
        return list(self.r.eval(_TAKE, 2, self.pending, self.wake, WAKE_TTL_S))  # type: ignore[arg-type]

    def wait(self, timeout_s: float) -> list[bytes]:
        """Wait up to ``timeout_s`` for payloads; return all that are queued (at most ``BATCH_MAX``)."""
        if self._has_blmpop is None:
            version = str(self.r.info("server").get("redis_version", "0"))
            self._has_blmpop = int(version.split(".")[0]) >= 7
        if self._has_blmpop:
            # BLMPOP (Redis 7) answers at once with all that is queued (up to the count), or waits for one.
            got: Any = self.r.blmpop(timeout_s, 1, self.pending, direction="LEFT", count=BATCH_MAX)
            return list(got[1]) if got else []
        # Older servers (`azu up` runs 6.2): BLPOP waits for the first, then take the rest in one go.
        first: Any = self.r.blpop([self.pending], timeout=timeout_s)
        if not first:
            return []
        pipe = self.r.pipeline()
        pipe.lrange(self.pending, 0, BATCH_MAX - 2)
        pipe.ltrim(self.pending, BATCH_MAX - 1, -1)
        rest = pipe.execute()[0]
        return [first[1], *rest]

    def keep_awake(self) -> None:
        """Keep the wake key for another ``WAKE_TTL_S``: the worker is about to wake itself by message."""
        self.r.expire(self.wake, WAKE_TTL_S)

    def release(self) -> bool:
        """Clear the wake key if nothing is pending; False if something arrived meanwhile (take it)."""
        return bool(self.r.eval(_RELEASE, 2, self.pending, self.wake))
