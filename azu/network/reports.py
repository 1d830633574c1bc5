"""Where workers' reports wait for the core, and how the collector takes them: a share of each worker's own
list per round, so that one worker's flood delays its own reports only.

A worker RPUSHes its signed reports onto its own list, ``azu:reports:from:<id>`` (its Redis login may push to
no other list, so the list says who pushed), then its id onto ``azu:reports:ready``: a hint that the list
holds reports (``push``). The collector (azu.network.collector) waits on the hints, and each round
(``ReportLists.take``, one Lua script) takes up to a share of every hinted list; a list that still holds
reports after its share is hinted again, at the back, behind the hints that came meanwhile.

A hint is only a hint: any worker may push any id, and a hint for an empty list costs the round one LLEN (a
flood of hints costs the collector about what it costs Redis to store them; no report is read twice or
passed over). A hint lost on the way (a connection cut between the two pushes) is made up by the sweep: about
once a second a round also looks at every enrolled worker's list (``azu:reporters``, written at enrollment).

Before this, every worker pushed to one list, ``azu:reports``: a worker that pushed 20,000 signed reports
(each an Ed25519 check for the collector) held every other worker's tokens behind them for seconds
(bench/reports.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis

from azu.network import keys

BATCH_MAX = 1024  # reports a round takes in all (the share shrinks as more lists wait) ...
SHARE = 128  # ... and from each list at most: a flooder delays the others by one round of this
MIN_SHARE = 16  # ... and at least, however many lists wait
HINTS_MAX = 1024  # hints a round reads (the rest wait for the next round)
MIN_BLOCK_S = 0.01  # Redis before 7.0.8 reads a blocking timeout under 1 ms as "for ever"

# KEYS[1]: the hints. ARGV: the lists' base name, BATCH_MAX, SHARE, MIN_SHARE, HINTS_MAX, then the ids swept
# this round. Returns id, reports, id, reports... for each list it took from. A list keeps the reports beyond
# its share, and its id goes back on the hints, behind the others. A hint longer than any worker id (40
# characters) names no list a worker could have pushed to: it is dropped before it names a key.
_TAKE = """
local base = ARGV[1]
local ids, seen = {}, {}
local function candidate(id)
  if #id <= 64 and not seen[id] then seen[id] = true; ids[#ids + 1] = id end
end
for _, id in ipairs(redis.call('LPOP', KEYS[1], ARGV[5]) or {}) do candidate(id) end
for i = 6, #ARGV do candidate(ARGV[i]) end
local lengths, waiting = {}, 0
for i, id in ipairs(ids) do
  local n = redis.pcall('LLEN', base .. ':from:' .. id)
  if type(n) ~= 'number' then n = 0 end
  lengths[i] = n
  if n > 0 then waiting = waiting + 1 end
end
local share = math.floor(tonumber(ARGV[2]) / math.max(waiting, 1))
share = math.max(tonumber(ARGV[4]), math.min(tonumber(ARGV[3]), share))
local out = {}
for i, id in ipairs(ids) do
  if lengths[i] > 0 then
    out[#out + 1] = id
    out[#out + 1] = redis.call('LPOP', base .. ':from:' .. id, share)
    if lengths[i] > share then redis.call('RPUSH', KEYS[1], id) end
  end
end
return out
"""


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


def enrolled(r: redis.Redis) -> list[str]:
    """The ids whose lists the sweep looks at: every enrolled worker (``azu:reporters``)."""
    return sorted(keys.as_str(w) for w in r.smembers(keys.REPORTERS))


class ReportLists:
    """The collector's side: rounds over the hinted lists (``base``: tests keep their lists apart)."""

    def __init__(self, r: redis.Redis, base: str = keys.REPORTS) -> None:
        self.r = r
        self.base = base
        self.hints = keys.report_hints(base)

    def take(self, wait_s: float | None, *, sweep: Iterable[str] = ()) -> tuple[list[bytes], list[str]]:
        """A round: wait up to ``wait_s`` for a hint (None: no wait), then take a share of each hinted list
        and of each list in ``sweep``, in one round trip. Returns the reports and, for each, the worker whose
        list it came from: the only worker whose login could push it there."""
        # EVAL, not a registered script: in a pipeline redis-py would ask SCRIPT EXISTS first, a round trip.
        args = [_TAKE, 1, self.hints, self.base, BATCH_MAX, SHARE, MIN_SHARE, HINTS_MAX, *sweep]
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
