"""Celery settings (``app.config_from_object``), from azu's settings: ``azu.config.get_settings()``."""

from __future__ import annotations

from azu.config import get_settings
from azu.network import dispatch

_settings = get_settings()

broker_url = _settings.redis_url
result_backend = None  # the chain carries itself; results travel on Redis streams, never AsyncResult.get()
task_ignore_result = True

# Workers are strangers: never pickle. msgpack carries bytes (tensors as safetensors bytes).
task_serializer = "msgpack"
result_serializer = "msgpack"
accept_content = ["msgpack", "json"]
result_accept_content = ["msgpack", "json"]

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
# task_id: the running task's id on every record ("-" outside a task), set by workers.AzuTask.
worker_log_format = "[%(asctime)s: %(levelname)s/%(processName)s] [%(task_id)s] %(message)s"
broker_connection_retry_on_startup = True

# --- the worker profile: a GPU worker (AZU_WORKER_ID set) is a stranger with a broker login of its own ---
# Its Redis ACL user w-<id> (azu.network.enrollment.worker_acl) reaches only its own keys, so:
# - priority_steps=[0] in every azu process: kombu would otherwise also BRPOP/LPUSH "<queue>\x06\x16{3,6,9}",
#   keys the worker's ACL does not name (and a `gpu.w1*` pattern would also match gpu.w10);
# - its unacked messages go to unacked:<id> / unacked_index:<id> / unacked_mutex:<id>: the default global
#   `unacked` hash holds the body of every in-flight message of every consumer;
# - no remote control: the pidbox would let it read and answer broadcasts (its ACL refuses them anyway, and
#   a worker with remote control on dies at startup on NOPERM). Core workers keep remote control (Flower).
# - the dispatcher publishes with declare=[] (workers/__init__.py): declaring a queue reads it (LLEN).
_worker_id = _settings.worker.worker_id
WORKER_PROFILE = _worker_id is not None
broker_transport_options: dict[str, object] = {"priority_steps": [0]}
if WORKER_PROFILE:
    broker_transport_options.update({
        "unacked_key": f"unacked:{_worker_id}",
        "unacked_index_key": f"unacked_index:{_worker_id}",
        "unacked_mutex_key": f"unacked_mutex:{_worker_id}",
    })
    worker_enable_remote_control = False
    # Only what the core's dispatcher sends (msgpack, read within limits: workers/): kombu's JSON decoder has
    # none, and another worker's login may write this worker's queue.
    accept_content = ["msgpack"]
task_default_queue = dispatch.CORE_QUEUE
task_create_missing_queues = True

task_routes = {
    "workers.scheduler.*": {"queue": dispatch.CORE_QUEUE},
    "workers.payouts.*": {"queue": dispatch.CORE_QUEUE},
    "workers.registry.*": {"queue": dispatch.REGISTRY_QUEUE},
    # workers.stage.* is routed per call: sig.set(queue="gpu.<worker_id>")
}

timezone = "UTC"
enable_utc = True

# Beat runs as its own supervised process (`celery -A workers beat`, azu.cli.processes.beat_argv), never
# embedded in the scheduler's worker (a SIGKILLed worker would orphan it: two beats, every tick twice). Its
# schedule lives in memory: beat's default shelve store would write a pickle file.
beat_scheduler = "celery.beat:Scheduler"

# Payouts (workers/payouts.py): pay due workers, then follow sent payouts, every PAYOUT_INTERVAL_S seconds.
# expires: a tick nobody ran before the next one is dropped rather than piled up.
_payout_interval_s = _settings.payout_interval_s
beat_schedule = {
    "payouts-pay-due": {"task": "workers.payouts.pay_due", "schedule": _payout_interval_s,
                        "options": {"expires": _payout_interval_s}},
    "payouts-confirm-sent": {"task": "workers.payouts.confirm_sent", "schedule": _payout_interval_s,
                             "options": {"expires": _payout_interval_s}},
}

# The job watchdog (workers/scheduler.py): fail stalled jobs, start jobs whose layers finished loading.
_watchdog_interval_s = _settings.watchdog_interval_s
beat_schedule["jobs-watchdog"] = {"task": dispatch.WATCHDOG, "schedule": _watchdog_interval_s,
                                  "options": {"expires": _watchdog_interval_s}}
# No hold left behind (workers/scheduler.py, azu/billing/reconcile.py): close the holds whose jobs ended, were
# forgotten by Redis, or are past their deadline, every AZU_RECONCILE_INTERVAL_S seconds.
_reconcile_interval_s = _settings.reconcile_interval_s
beat_schedule["holds-reconcile"] = {"task": "workers.scheduler.reconcile", "schedule": _reconcile_interval_s,
                                    "options": {"expires": _reconcile_interval_s}}
# Flower / `celery events` see tasks when workers send task events: `-E` or AZU_TASK_EVENTS=1.
worker_send_task_events = _settings.task_events
task_send_sent_event = worker_send_task_events
