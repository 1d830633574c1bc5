"""Every Redis key azu uses, in one place, with who writes it and what it holds.

Nothing here must survive a Redis restart: money lives in PostgreSQL, shard files on the registry's disk.
A job's keys expire a day after its last change (``JOB_TTL_S``).

==============================  ======================================================================
``azu:job:<id>``                hash: user, model, status, prompt ids, sampling params, route, usage...
``azu:job:<id>:events``         stream: one entry per step, id ``0-<step+1>`` (token, done, or error)
``azu:job:<id>:usage``          hash: worker id -> token-layers its stages ran for the job
``azu:jobs:active``             zset of unfinished jobs (the watchdog's list), scored by creation time
``azu:pending:<worker>``        list: step payloads for a worker that is busy (its inbox)
``azu:wake:<worker>``           set while a worker has been woken and has not yet taken its inbox
``azu:worker:<worker>``         JSON directory record of a worker (what it holds, its memory)
``azu:worker:<worker>:errors``  hash: model id -> why the worker could not load it
``azu:workers``                 zset worker id -> last heartbeat (unix seconds)
``azu:refused:<worker>``        counter of payloads the worker refused (bad token, malformed)
``azu:model:<id>``              hash: shard state, progress, reason, source, routing info
``azu:model:<id>:waiting``      zset of jobs waiting for the model's layers to be loaded
``azu:model:<id>:loading``      load orders in flight (JSON), with the load deadline as TTL
``azu:model:<id>:turn``         counter: round robin over a model's equally short routes
``azu:model:<id>:startlock``    lock while waiting jobs are started
``azu:models:ready``            set of ready model ids
``azu:ping:*``                  health-check answers written by workers
==============================  ======================================================================
"""

from __future__ import annotations

from typing import Any

JOB_TTL_S = 24 * 3600
ACTIVE_JOBS = "azu:jobs:active"
WORKERS = "azu:workers"
READY_MODELS = "azu:models:ready"
PING_PREFIX = "azu:ping:"


def as_str(value: Any) -> str:
    """A Redis answer (bytes, or str with decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


# --- jobs ---------------------------------------------------------------------------------------
def job(job_id: str) -> str:
    return f"azu:job:{job_id}"


def events(job_id: str) -> str:
    return f"azu:job:{job_id}:events"


def usage(job_id: str) -> str:
    return f"azu:job:{job_id}:usage"


# --- workers ------------------------------------------------------------------------------------
def pending(worker_id: str) -> str:
    return f"azu:pending:{worker_id}"


def wake(worker_id: str) -> str:
    return f"azu:wake:{worker_id}"


def worker(worker_id: str) -> str:
    return f"azu:worker:{worker_id}"


def worker_errors(worker_id: str) -> str:
    return f"azu:worker:{worker_id}:errors"


def refused(worker_id: str) -> str:
    return f"azu:refused:{worker_id}"


# --- models -------------------------------------------------------------------------------------
def model(model_id: str) -> str:
    return f"azu:model:{model_id}"


def waiting(model_id: str) -> str:
    return f"azu:model:{model_id}:waiting"


def loading(model_id: str) -> str:
    return f"azu:model:{model_id}:loading"


def turn(model_id: str) -> str:
    return f"azu:model:{model_id}:turn"


def start_lock(model_id: str) -> str:
    return f"azu:model:{model_id}:startlock"
