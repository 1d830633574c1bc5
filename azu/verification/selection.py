"""Which ended jobs the core re-computes: a share of all (``AZU_VERIFY_RATE``), and every job that went
through a new worker (fewer than ``AZU_VERIFY_NEW_JOBS`` passed checks) or a suspect one (a failed or
unresolved check). The draw is the core's (``secrets``), after the job ended: a worker cannot tell a checked
job from another until it is asked for evidence, and by then its commitments are in.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis

from azu.config import get_settings
from azu.network import keys
from azu.verification import status


def pick(r: redis.Redis, job_id: str, workers: Sequence[str], *, queue: str = keys.VERIFY_QUEUE) -> bool:
    """Queue ``job_id`` for a check (on ``queue``), or mark it not checked. Returns whether it was picked."""
    v = get_settings().verify
    pipe = r.pipeline(transaction=False)
    for w in workers:
        pipe.get(keys.verify_passed(w))
        pipe.sismember(keys.VERIFY_SUSPECT, w)
    answers = pipe.execute()
    must = any(int(passed or 0) < v.new_jobs or bool(suspect)
               for passed, suspect in zip(answers[::2], answers[1::2], strict=True))
    picked = must or secrets.randbelow(1_000_000) < int(v.rate * 1_000_000)
    pipe = r.pipeline(transaction=False)
    if picked:
        status.write(pipe, job_id, "pending")
        pipe.rpush(queue, job_id)
    else:
        status.write(pipe, job_id, "not_checked")
    pipe.execute()
    return picked
