"""Prometheus metrics: what the API, the workers and the core count, in three places.

- **API** (``API``): requests by route/method/status, latency, time to the first streamed token, refusals,
  jobs started. Each gunicorn process counts in memory; with ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus
  client's multiprocess mode) each process writes its counts to files in that folder and ``GET /metrics``
  (web/metrics.py) sums them, so a scrape sees every process whichever one answers. The folder must be
  emptied (or new) before gunicorn starts: files of an earlier run would be counted again.
- **Worker** (``worker_metrics()``): steps, batch sizes, step latency, refused payloads, KV-cache bytes and
  cached jobs, served by the worker process itself (``start_worker_server``, ``AZU_METRICS_PORT``, on
  loopback unless ``AZU_METRICS_HOST`` says otherwise): a worker is a stranger, its figures are its
  operator's. The core learns per-worker figures from the signed heartbeats anyway.
- **Core** (``CORE_*``): reports accepted/refused, tokens published, jobs ended, job time to first token,
  settlements, watchdog actions. These happen in whichever core process acts (the collector's lease holder,
  any ``core`` Celery worker, prefork children included), so they are counted in Redis hashes
  (``azu:metrics:<name>``; HINCRBY in the pipeline the work already sends) and read on scrape by the API's
  ``/metrics`` together with gauges read there and then: live workers, active jobs, the holds account's
  balance and payouts by state (PostgreSQL: one indexed row and one GROUP BY over the small payouts table).
  Counting in Redis keeps every core process's counts in one place with no port per process; workers'
  broker logins cannot write ``azu:metrics:*`` (their ACL), so they cannot inflate the core's figures.

Names are ``azu_*`` with units in the name; labels are a small fixed set (never job ids, keys or users).
Nothing here may fail the caller: a metric that cannot be written is dropped with a debug log.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# --- the API (one registry per process; summed over processes by /metrics in multiprocess mode) ---------
API = CollectorRegistry(auto_describe=True)
API_REQUESTS = Counter("azu_api_requests", "HTTP requests answered, by route template, method and status.",
                       ["route", "method", "status"], registry=API)
API_REQUEST_SECONDS = Histogram(
    "azu_api_request_duration_seconds",
    "Time from the request's start to its answer's headers (a stream's body is not included).",
    ["route", "method"], buckets=LATENCY_BUCKETS, registry=API)
API_TTFT_SECONDS = Histogram(
    "azu_api_time_to_first_token_seconds",
    "Streamed requests: time from the request's start to the first token the API read "
    "(a stop token that ends the answer at once counts).",
    ["route"], buckets=TTFT_BUCKETS, registry=API)
API_REFUSALS = Counter("azu_api_refusals", "4xx answers by status and error code (429: rate limits).",
                       ["status", "code"], registry=API)
API_JOBS_STARTED = Counter("azu_api_jobs_started", "Jobs the API started (held and submitted), by route.",
                           ["route"], registry=API)

_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def label(value: Any, *, default: str = "other") -> str:
    """A label value that cannot carry anything unbounded (free text, ids)."""
    text = str(value) if value is not None else ""
    return text if _LABEL_VALUE.fullmatch(text) else default


# --- a worker process --------------------------------------------------------------------------------------
class WorkerMetrics:
    """The worker's counters (made once per process, on first use: other processes never show them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.steps = Counter("azu_worker_steps", "Steps run here, by phase (prefill, decode, replay).",
                             ["phase"], registry=registry)
        self.batch_size = Histogram("azu_worker_batch_size", "Steps of one stage run by one forward call.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.step_seconds = Histogram("azu_worker_step_duration_seconds",
                                      "Time of one forward call of a stage (a batch or one step).",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.refused = Counter("azu_worker_refused_payloads",
                               "Payloads and orders refused here, by what was wrong (never who sent it).",
                               ["reason"], registry=registry)
        self.handovers = Counter("azu_worker_handovers",
                                 "Bundles of steps handed to the next worker, by path (direct, redis).",
                                 ["path"], registry=registry)
        self.nodes: weakref.WeakSet[Any] = weakref.WeakSet()
        registry.register(_NodeCollector(self.nodes))


WORKER = CollectorRegistry(auto_describe=True)


@cache
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics(WORKER)


def watch_node(node: Any) -> None:
    """Report ``node``'s KV cache and cached jobs on scrape (read then, under the node's lock)."""
    worker_metrics().nodes.add(node)


def kv_cache_bytes(stage: Any) -> int:
    """Bytes of key/value memory a stage holds for its jobs (azu.engine.stage.Stage.kv_cache_bytes)."""
    return int(stage.kv_cache_bytes())


class _NodeCollector(Collector):
    def __init__(self, nodes: weakref.WeakSet[Any]) -> None:
        self.nodes = nodes
        self._last = (0, 0)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        kv, cached = 0, 0
        try:
            for node in list(self.nodes):
                # A scrape waits at most a second for a forward to finish; else it shows the last figures.
                if not node.lock.acquire(timeout=1.0):
                    kv, cached = self._last
                    break
                try:
                    cached += len(node.jobs)
                    kv += sum(kv_cache_bytes(stage) for stage in node.stages.values())
                finally:
                    node.lock.release()
            else:
                self._last = (kv, cached)
        except Exception:  # a scrape must answer
            log.debug("KV cache figures unavailable", exc_info=True)
            kv, cached = self._last
        yield GaugeMetricFamily("azu_worker_kv_cache_bytes", "Bytes of KV cache this worker holds.", value=kv)
        yield GaugeMetricFamily("azu_worker_cached_jobs", "Jobs with KV cache on this worker.", value=cached)


def start_worker_server(port: int, *, host: str = "127.0.0.1") -> Any:
    """Serve the worker's metrics on ``host:port`` (prometheus_client's HTTP server, a daemon thread)."""
    worker_metrics()
    server, _thread = start_http_server(port, addr=host, registry=WORKER)
    log.info("worker metrics on http://%s:%d/metrics", host, port)
    return server


# --- the core: counters in Redis, read by the API's /metrics -----------------------------------------------
METRICS_PREFIX = "azu:metrics:"


def _field(labels: dict[str, str]) -> str:
    return "|".join(f"{k}={label(labels[k])}" for k in sorted(labels))


def _parse_field(field: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in field.split("|") if "=" in part)


class CoreCounter:
    """A counter kept in the Redis hash ``azu:metrics:<name>`` (one field per label set)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.key = METRICS_PREFIX + name

    def inc(self, r: Any, amount: int = 1, **labels: Any) -> None:
        """HINCRBY on ``r`` (a client, or a pipeline the caller executes)."""
        if amount <= 0:
            return
        try:
            r.hincrby(self.key, _field({k: str(labels.get(k, "")) for k in self.labelnames}), int(amount))
        except Exception:
            log.debug("metric %s not counted", self.name, exc_info=True)

    def family(self, raw: dict[Any, Any]) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for field, value in sorted((_str(k), _str(v)) for k, v in raw.items()):
            labels = _parse_field(field)
            fam.add_metric([labels.get(n, "") for n in self.labelnames], float(value))
        return fam


class CoreHistogram:
    """A histogram kept in one Redis hash: a count per bucket (``b<i>``), ``sum`` and ``count``."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.buckets = name, documentation, buckets
        self.key = METRICS_PREFIX + name

    def observe(self, r: Any, value: float) -> None:
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        try:
            r.hincrby(self.key, f"b{index}", 1)
            r.hincrbyfloat(self.key, "sum", float(value))
            r.hincrby(self.key, "count", 1)
        except Exception:
            log.debug("metric %s not observed", self.name, exc_info=True)

    def family(self, raw: dict[Any, Any]) -> HistogramMetricFamily:
        values = {_str(k): float(_str(v)) for k, v in raw.items()}
        cumulative, buckets = 0.0, []
        for i, bound in enumerate((*self.buckets, float("inf"))):
            cumulative += values.get(f"b{i}", 0.0)
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        fam = HistogramMetricFamily(self.name, self.documentation)
        fam.add_metric([], buckets, sum_value=values.get("sum", 0.0))
        return fam


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


CORE_REPORTS = CoreCounter("azu_core_reports", "Workers' signed reports by kind and outcome (accepted, "
                           "refused, duplicate, error); kind 'unverified': its signature did not check.",
                           ("kind", "outcome"))
CORE_TOKENS = CoreCounter("azu_core_tokens_generated", "Tokens the core published (every job, every route).")
CORE_JOBS_ENDED = CoreCounter("azu_core_jobs_ended", "Jobs ended by the collector, by finish reason.",
                              ("reason",))
CORE_TTFT = CoreHistogram("azu_core_time_to_first_token_seconds",
                          "Every job (/submit and chat): from its submission to its first published token.",
                          TTFT_BUCKETS)
CORE_SETTLEMENTS = CoreCounter("azu_core_settlements", "Ended jobs billed, by outcome (settled, released).",
                               ("outcome",))
CORE_WATCHDOG = CoreCounter("azu_core_watchdog_actions", "What the watchdog did (fail_stalled, "
                            "fail_load_timeout, retry_waiting).", ("action",))
CORE_METRICS: tuple[CoreCounter | CoreHistogram, ...] = (
    CORE_REPORTS, CORE_TOKENS, CORE_JOBS_ENDED, CORE_TTFT, CORE_SETTLEMENTS, CORE_WATCHDOG)


class CoreFacts(Collector):
    """What the API's /metrics adds to its own counts: the core's Redis counters and live gauges."""

    def __init__(self, r: Any, *, ledger: Any = None) -> None:
        self.r, self.ledger = r, ledger

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        up = 1.0
        try:
            yield from self._redis()
        except Exception as exc:
            up = 0.0
            log.warning("metrics: Redis figures unavailable (%s)", type(exc).__name__)
        if self.ledger is not None and self.ledger.configured:
            try:
                yield from self._ledger()
            except Exception as exc:
                up = 0.0
                log.warning("metrics: ledger figures unavailable (%s)", type(exc).__name__)
        yield GaugeMetricFamily("azu_core_scrape_ok", "1 when every core figure could be read.", value=up)

    def _redis(self) -> Iterable[Any]:
        from azu.config import get_settings
        from azu.network import keys

        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for m in CORE_METRICS:
            pipe.hgetall(m.key)
        pipe.zcount(keys.WORKERS, now - get_settings().heartbeat_ttl_s, "+inf")
        pipe.zcard(keys.ACTIVE_JOBS)
        *raws, live, active = pipe.execute()
        families: list[Any] = [m.family(raw) for m, raw in zip(CORE_METRICS, raws, strict=True)]
        families.append(GaugeMetricFamily("azu_core_workers_live", "Workers heartbeating within the TTL.",
                                          value=float(live)))
        families.append(GaugeMetricFamily("azu_core_jobs_active", "Jobs queued or running.",
                                          value=float(active)))
        return families

    def _ledger(self) -> Iterable[Any]:
        from sqlalchemy import func, select

        from azu.billing.ledger.models import Account, AccountKind, Payout, PayoutStatus

        with self.ledger.engine.connect() as conn:
            held = conn.execute(select(Account.balance).where(
                Account.kind == AccountKind.HOLDS.value, Account.owner == "")).scalar()
            rows = conn.execute(select(Payout.status, func.count(), func.coalesce(func.sum(Payout.amount), 0))
                                .group_by(Payout.status)).all()
        holds = GaugeMetricFamily("azu_core_holds_outstanding_base_units",
                                  "What running jobs hold from their users (the holds account), base units.",
                                  value=float(held or 0))
        count = GaugeMetricFamily("azu_core_payouts", "Payouts by state.", labels=["state"])
        amount = GaugeMetricFamily("azu_core_payouts_base_units", "Payout amounts by state, base units.",
                                   labels=["state"])
        found = {status: (n, total) for status, n, total in rows}
        for state in PayoutStatus:
            n, total = found.get(state.value, (0, 0))
            count.add_metric([state.value], float(n))
            amount.add_metric([state.value], float(total))
        return [holds, count, amount]


class Tally:
    """Counts gathered over one batch of work, written as one HINCRBY each at the end."""

    def __init__(self) -> None:
        self.counts: dict[tuple[Any, tuple[tuple[str, str], ...]], int] = {}
        self.lock = threading.Lock()

    def add(self, metric: CoreCounter, amount: int = 1, **labels: str) -> None:
        key = (metric, tuple(sorted(labels.items())))
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + amount

    def write(self, pipe: Any) -> None:
        """Queue the counts on ``pipe`` (the caller's round trip carries them) and start over."""
        with self.lock:
            counts, self.counts = self.counts, {}
        for (metric, labels), n in counts.items():
            metric.inc(pipe, n, **dict(labels))

    def flush(self, r: Any) -> None:
        """Write the counts in a round trip of their own (none when there is nothing to count)."""
        if not self.counts:
            return
        try:
            pipe = r.pipeline(transaction=False)
            self.write(pipe)
            pipe.execute()
        except Exception:
            log.debug("core metrics not written", exc_info=True)
