"""Every Redis key azu uses, in one place, with who writes it and what it holds.

Since the "Open network" issue a worker writes none of the facts: job hashes, streams, the directory, model
status are written by core processes only (the collector, azu.network.collector, acts on the workers' signed
reports). What a worker may still touch is listed in docs/architecture.md (and enforced by its Redis ACL).

Money lives in PostgreSQL, shard files on the registry's disk. The core's Redis runs with AOF (everysec): a
job's hash is the record its bill is made from until it is billed (the reconciler, azu.billing.reconcile,
closes every hold whose job ended, was forgotten or is stuck). A job's keys expire a day after its last change
(``JOB_TTL_S``). Worker ACL users are not in the AOF: the core re-creates them from
``azu:acl:logins`` (the hash of each worker's password) after a restart.

==============================  ======================================================================
``azu:job:<id>``                hash: user, model, status, prompt ids, sampling, grant, usage, the core-signed
                                end record (or the reconciler's tombstone of a job Redis forgot)
``azu:job:<id>:events``         stream: one entry per step, id ``0-<step+1>`` (token, done, or error)
``azu:job:<id>:usage``          retired (workers counted usage here; the core computes it now)
``azu:jobs:active``             zset of unfinished jobs (the watchdog's list), scored by creation time
``azu:pending:<worker>``        list: step payloads for a worker that is busy (its inbox)
``azu:wake:<worker>``           set while a worker has been woken and has not yet taken its inbox
``azu:worker:<worker>``         JSON directory record of a worker (what it holds, its memory)
``azu:worker:<worker>:errors``  hash: model id -> why the worker could not load it
``azu:workers``                 zset worker id -> last heartbeat (unix seconds)
``azu:room``                    zset worker id -> minus the bytes free for more layers, as its last heartbeat
                                said (the collector writes it with the record: placement reads the first
                                ranks, the roomiest)
``azu:lost``                    zset worker id -> when the core found it lost (no routes until it restarts)
``azu:refused:<worker>``        counter of payloads the worker reported refusing (bad grant, malformed)
``azu:identity:<worker>``       the worker's Ed25519 public key (hex), written by the core at enrollment
``azu:assigned:<worker>``       spans (JSON [model, first, last, emb, head]) the core ordered it to load
``azu:reports:from:<worker>``   list of the worker's signed reports (it RPUSHes its own only; the
                                collector takes a share of each list in turn: a flood delays its sender)
``azu:reports:ready``           list of worker ids whose list holds reports (hints: workers RPUSH, the
                                collector pops)
``azu:reporters``               set of enrolled worker ids (the collector sweeps their lists), core-written
``azu:reports``                 retired (the one list every worker pushed to)
``azu:collector:lock``          the running collector's lease (one collector acts at a time)
``azu:model:<id>``              hash: shard state, progress, reason, source, routing info, ``placed``
``azu:model:<id>:waiting``      zset of jobs waiting for the model's layers to be loaded
``azu:model:<id>:loading``      load orders in flight (JSON), with the load deadline as TTL
``azu:model:<id>:orders``       hash ``<worker> <span>`` -> when ordered (``failed:<when>``: not again soon)
``azu:model:<id>:holders``      zset worker -> last heartbeat holding an ordered span of the model (the
                                collector writes it with the record: submit reads only these workers)
``azu:model:<id>:spans``        zset span name -> last heartbeat in which a worker held that span (ordered)
``azu:model:<id>:span:<s>:holders``  zset worker -> last heartbeat holding span ``<s>`` (``span_name``): a
                                submit reads a window of each span's (written with the model's index)
``azu:acl:logins``              hash worker -> SHA-256 of its broker password (to re-create lost ACL users)
``azu:model:<id>:turn``         counter: round robin over a model's equally short routes
``azu:model:<id>:startlock``    lock while waiting jobs are started
``azu:models:ready``            set of ready model ids
``azu:ping:*``                  health-check answers (the collector writes a worker's pong)
``azu:enroll:challenge:<c>``    enrollment challenge -> worker id (single use, 5 minutes)
``azu:enroll:lock:<id>``        one enrollment of an id at a time
``azu:identity:<id>:wallet``    the worker's payout wallet when no ledger is configured
``azu:metrics:<name>``          core counters (reports, tokens, settlements, watchdog), core writers only
``azu:job:<id>:commits``        hash ``<epoch>:<hop>:<first row>`` -> a stage's signed commitment report
                                (the first kept: it cannot be changed); ``<epoch>:<hop>:final`` -> rows
``azu:job:<id>:evidence:<w>``   the signed bundles worker ``w`` kept for the job, sent on the verifier's
                                order
                                (``...:asked`` while the order is out: evidence nobody asked for is refused)
``azu:verify:queue``            ended jobs picked for a check (the collector pushes, the verifier pops)
``azu:verify:lock``             the running verifier's lease
``azu:verify:passed:<w>``       checks worker ``w`` passed (below AZU_VERIFY_NEW_JOBS: every job checked)
``azu:verify:strikes:<w>``      counter of checks worker ``w`` failed
``azu:verify:suspect``          set of workers every job of which is checked
``azu:banned``                  hash worker -> why it is off routes (AZU_VERIFY_BAN_AFTER failed checks)
==============================  ======================================================================
"""

from __future__ import annotations

from typing import Any

JOB_TTL_S = 24 * 3600
ACTIVE_JOBS = "azu:jobs:active"
WORKERS = "azu:workers"
ROOM = "azu:room"
LOST_WORKERS = "azu:lost"
READY_MODELS = "azu:models:ready"
PING_PREFIX = "azu:ping:"
REPORTS = "azu:reports"
REPORTERS = "azu:reporters"
COLLECTOR_LOCK = "azu:collector:lock"


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


def commits(job_id: str) -> str:
    return f"azu:job:{job_id}:commits"


def evidence(job_id: str, worker_id: str) -> str:
    return f"azu:job:{job_id}:evidence:{worker_id}"


def evidence_asked(job_id: str, worker_id: str) -> str:
    """Set by the verifier when it orders a worker's evidence: the collector takes only evidence asked for."""
    return f"azu:job:{job_id}:evidence:{worker_id}:asked"


VERIFY_QUEUE = "azu:verify:queue"
VERIFY_LOCK = "azu:verify:lock"
VERIFY_SUSPECT = "azu:verify:suspect"
BANNED = "azu:banned"
ACL_LOGINS = "azu:acl:logins"  # hash: worker id -> SHA-256 (hex) of its broker password (core-written)


def verify_passed(worker_id: str) -> str:
    return f"azu:verify:passed:{worker_id}"


def verify_strikes(worker_id: str) -> str:
    return f"azu:verify:strikes:{worker_id}"


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


def identity(worker_id: str) -> str:
    """The worker's public key (hex): written by the core from its enrollment, never changed."""
    return f"azu:identity:{worker_id}"


def reports_from(worker_id: str, base: str = REPORTS) -> str:
    """The worker's own report list: its login may push there and nowhere else (``base``: tests' lists)."""
    return f"{base}:from:{worker_id}"


def report_hints(base: str = REPORTS) -> str:
    """list: ids of workers whose report list holds reports (anyone may push one: only a hint)."""
    return f"{base}:ready"


def assigned(worker_id: str) -> str:
    """The spans the core ordered the worker to load: the only holdings placement believes."""
    return f"azu:assigned:{worker_id}"


# --- models -------------------------------------------------------------------------------------
def model(model_id: str) -> str:
    return f"azu:model:{model_id}"


def waiting(model_id: str) -> str:
    return f"azu:model:{model_id}:waiting"


def loading(model_id: str) -> str:
    return f"azu:model:{model_id}:loading"


def orders(model_id: str) -> str:
    """hash: ``<worker> <span>`` -> when the core ordered that load (or ``failed:<when>``)."""
    return f"azu:model:{model_id}:orders"


def holders(model_id: str) -> str:
    """zset: worker id -> the last heartbeat in which it held a span of the model the core ordered it."""
    return f"azu:model:{model_id}:holders"


def held_spans(model_id: str) -> str:
    """zset: span name (``span_name``) -> the last heartbeat in which a worker held that span of the model."""
    return f"azu:model:{model_id}:spans"


def span_holders_prefix(model_id: str) -> str:
    """What the key of one span's holders starts with; ``SPAN_HOLDERS_SUFFIX`` ends it."""
    return f"azu:model:{model_id}:span:"


SPAN_HOLDERS_SUFFIX = ":holders"


def span_holders(model_id: str, name: str) -> str:
    """zset: worker id -> the last heartbeat in which it held the span named ``name`` of the model."""
    return span_holders_prefix(model_id) + name + SPAN_HOLDERS_SUFFIX


def span_name(first: int, last: int, embeddings: bool, head: bool) -> str:
    """A span as the indexes name it: ``0-12+e``, ``12-24+h``, ``0-24+e+h``."""
    return f"{first}-{last}{'+e' if embeddings else ''}{'+h' if head else ''}"


def turn(model_id: str) -> str:
    return f"azu:model:{model_id}:turn"


def start_lock(model_id: str) -> str:
    return f"azu:model:{model_id}:startlock"
