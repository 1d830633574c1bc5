"""Where workers' reports wait for the core, and how the collector takes them: a share of each worker's own
list per round, so that one worker's flood delays its own reports only.

A worker RPUSHes its signed reports onto its own list, ``azu:reports:from:<id>`` (its Redis login may push to
no other list, so the list says who pushed), then its id onto ``azu:reports:ready``: a hint that the list
holds reports (``push``). The collector (azu.network.collector) waits on the hints, and each round
(``ReportLists.take``, one Lua script) takes up to a share of every hinted list; a list that still holds
reports after its share is hinted again, at the back, behind the hints that came meanwhile.

A hint is only a hint: any worker may push any id, and a hint for an empty list costs the round one LLEN; a
backlog of more hints than a round reads is dropped (a flood of hints must not queue the others' behind it).
Lists are also found without their hint: each round looks first at the lists of the workers whose tokens
the collector published in the last seconds (the last hops of running jobs: a job's next token does not
wait behind anyone's hints), and about once a second at the next ``sweep_size`` enrolled workers' lists
(``azu:reporters``, written at enrollment, read with SSCAN; the sweep), for a hint lost (a connection cut
between the two pushes, a dropped backlog).

Before this, every worker pushed to one list, ``azu:reports``: a worker that pushed 20,000 signed reports
(each an Ed25519 check for the collector) held every other worker's tokens behind them for seconds
(bench/reports.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from azu.network import auth, keys
from azu.network.inbox import MIN_BLOCK_S
from azu.network.wire import Report

if TYPE_CHECKING:
    from nacl.signing import SigningKey

BATCH_MAX = 1024  # reports a round takes in all, shared among the lists that wait ...
SHARE = 128  # ... from each list at most: a flooder delays the others by a round of this
MIN_SHARE = 16  # ... and at least: a round serves BATCH_MAX // MIN_SHARE lists (the rest first next round)
HINTS_MAX = 1024  # hints a round reads; more than this many left after them are dropped (only hints)
# Enrolled workers' lists a sweep round looks at (SSCAN's count; the next ones the round after, about a second
# later): at least SWEEP_MIN, and more where more are enrolled, so that every list is looked at within about
# SWEEP_WHOLE_S rounds, well inside a heartbeat's life (15 s), up to SWEEP_CAP a round. A fixed 1000 took a
# second for each 1000 enrolled: a report whose hint was lost waited longer than a heartbeat lives once more
# than about 15,000 were enrolled. A round costs the collector's thread (and Redis, in one script) 1.9 ms for
# 1000 lists, 4.0 ms for 3000, 6.8 ms for 5000 (bench/reports.py, 2026-12-05): the cap holds it under 1% of
# a second, and a whole sweep stays within 15 s up to 75,000 enrolled.
SWEEP_MIN = 1000
SWEEP_WHOLE_S = 5
SWEEP_CAP = 5000


def sweep_size(enrolled: int) -> int:
    """How many enrolled workers' lists a sweep round looks at, with ``enrolled`` workers enrolled."""
    return min(SWEEP_CAP, max(SWEEP_MIN, math.ceil(enrolled / SWEEP_WHOLE_S)))


# KEYS[1]: the hints. ARGV: the lists' names less the worker id (``keys.reports_from``: one place for the
# name), BATCH_MAX, SHARE, MIN_SHARE, HINTS_MAX, the count of the ids that go first, those ids (the last hops
# that published tokens lately), then the ids to look at after the hinted ones (a slice of the sweep).
# Returns id, reports, id, reports... for each list it took from: first the lists that fit in MIN_SHARE (a
# lone token goes ahead of a flood's share), then the others, each group in candidate order.
#
# - A hint longer than 64 characters (worker ids are at most 40) names no list a worker could push to:
#   dropped before it names a key. When more than HINTS_MAX hints remain after a round's HINTS_MAX, they are
#   dropped (UNLINK: freed off Redis's thread): a flood of hints must not queue the others' hints behind it;
#   their lists are found by the first ids and the sweep.
# - A round serves BATCH_MAX // MIN_SHARE lists at most; up to HINTS_MAX of the lists waiting beyond them
#   are hinted again at the front (their turn first next round), and a served list with reports left at
#   the back.
_TAKE = """
local prefix = ARGV[1]
local batch, share_max, share_min = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hints_max, first = tonumber(ARGV[5]), tonumber(ARGV[6])
local ids, seen = {}, {}
local function candidate(id)
  if #id <= 64 and not seen[id] then seen[id] = true; ids[#ids + 1] = id end
end
for i = 7, 6 + first do candidate(ARGV[i]) end
for _, id in ipairs(redis.call('LPOP', KEYS[1], hints_max) or {}) do candidate(id) end
if redis.call('LLEN', KEYS[1]) > hints_max then redis.call('UNLINK', KEYS[1]) end
for i = 7 + first, #ARGV do candidate(ARGV[i]) end
local waiting = {}
for _, id in ipairs(ids) do
  local n = redis.pcall('LLEN', prefix .. id)
  if type(n) == 'number' and n > 0 then waiting[#waiting + 1] = {id, n} end
end
local served = math.min(#waiting, math.floor(batch / share_min))
for i = math.min(#waiting, served + hints_max), served + 1, -1 do
  redis.call('LPUSH', KEYS[1], waiting[i][1])
end
local share = math.max(share_min, math.min(share_max, math.floor(batch / math.max(served, 1))))
local out = {}
for pass = 1, 2 do
  for i = 1, served do
    local id, n = waiting[i][1], waiting[i][2]
    if (pass == 1) == (n <= share_min) then
      out[#out + 1] = id
      out[#out + 1] = redis.call('LPOP', prefix .. id, share)
      if n > share then redis.call('RPUSH', KEYS[1], id) end
    end
  end
end
return out
"""


def sign(key: SigningKey, worker_id: str, kind: str, body: dict[str, Any]) -> bytes:
    """A packed report of ``worker_id``'s, signed with its key (``auth.REPORT``): what ``push`` queues."""
    sig = auth.sign(key, auth.REPORT, Report(worker_id, kind, body).signed_part())
    return Report(worker_id, kind, body, sig).pack()


def push(r: Any, worker_id: str, blobs: Sequence[bytes], *, base: str = keys.REPORTS) -> None:
    """Queue ``worker_id``'s packed reports on its own list, then hint the collector. ``r``: a client (both
    pushes go in one round trip) or a pipeline (they go with it, in order: the hint after the reports)."""
    if not blobs:
        return
    pipe = r if isinstance(r, redis.client.Pipeline) else r.pipeline(transaction=False)
    pipe.rpush(keys.reports_from(worker_id, base), *blobs)
    pipe.rpush(keys.report_hints(base), worker_id)
    if pipe is not r:
        pipe.execute()


class ReportLists:
    """The collector's side: rounds over the hinted lists (``base``: tests keep their lists apart)."""

    def __init__(self, r: redis.Redis, base: str = keys.REPORTS) -> None:
        self.r = r
        self.hints = keys.report_hints(base)
        self.prefix = keys.reports_from("", base)  # a worker's list is this and its id

    def take(self, wait_s: float | None, *, first: Sequence[str] = (),
             also: Iterable[str] = ()) -> tuple[list[bytes], list[str]]:
        """A round: wait up to ``wait_s`` for a hint (None: no wait), then take a share of each list of a
        worker in ``first`` (the last hops that published tokens lately: before the hinted ones), of each
        hinted list, and of each list in ``also`` (a slice of the sweep), in one round trip. Returns the
        reports and, for each, the worker whose list it came from: the only worker whose login could push
        it there."""
        # EVAL, not a registered script: in a pipeline redis-py would ask SCRIPT EXISTS first, a round trip.
        args = [_TAKE, 1, self.hints, self.prefix, BATCH_MAX, SHARE, MIN_SHARE, HINTS_MAX, len(first), *first,
                *also]
        if wait_s is None:
            got = self.r.execute_command("EVAL", *args)
        else:
            pipe = self.r.pipeline(transaction=False)
            # A blocking look at the first hint that leaves it in place (moved from the head to the head):
            # the script queued behind it runs as soon as it answers, in the same round trip.
            pipe.execute_command("BLMOVE", self.hints, self.hints, "LEFT", "LEFT", max(wait_s, MIN_BLOCK_S))
            pipe.execute_command("EVAL", *args)
            got = pipe.execute()[1]
        blobs: list[bytes] = []
        senders: list[str] = []
        for i in range(0, len(got), 2):
            sender = keys.as_str(got[i])
            blobs += got[i + 1]
            senders += [sender] * len(got[i + 1])
        return blobs, senders
