"""A job's verification status, as users see it (``/results`` and the chat completion's ``azu`` field).

The verifier (a core process, azu.verification.verifier) writes it into the job's hash (field ``verify``,
JSON); only core processes write job hashes. Values of ``status``:

- ``pending``: the job ended and was picked for a check that has not finished yet
- ``verified``: re-computed; every stage's commitments and the tokens match
- ``failed``: a stage's numbers did not match; ``hop``/``worker`` name it, ``reason`` says how; its earnings
  for the job were withheld and the user refunded
- ``inconclusive``: a mismatch that could not be pinned on one worker with evidence (nobody is penalized)
- ``not_checked``: the job ended and was not picked (checks are sampled)

A running job (or one ended before verification existed) has no status: ``read`` answers None.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from azu.network import keys

FIELD = "verify"
STATUSES = ("pending", "verified", "failed", "inconclusive", "not_checked")


def read(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The job's verification status (a dict with at least ``status``), or None."""
    raw = r.hget(keys.job(job_id), FIELD)
    return parse(raw)


def parse(raw: Any) -> dict[str, Any] | None:
    """The status stored in a job hash's ``verify`` field (bytes or str), or None."""
    if not raw:
        return None
    try:
        value = json.loads(keys.as_str(raw))
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("status") in STATUSES else None


def write(r: redis.Redis | Any, job_id: str, status: str, **detail: Any) -> None:
    """Store the status (``r`` may be a pipeline). Core processes only."""
    if status not in STATUSES:
        raise ValueError(f"unknown verification status {status!r}")
    r.hset(keys.job(job_id), FIELD, json.dumps({"status": status, **detail}, sort_keys=True))
