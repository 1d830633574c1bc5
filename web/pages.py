"""The user's web page and the read-only network view it shows.

    GET /            the page: a chat playground (streams /v1/chat/completions), balance and deposits,
                     wallet-signed API keys, and the network (workers, who holds which layers, tokens/s)
    GET /network     JSON: live workers, the spans each holds per model, whether a model has a complete
                     route, and the tokens/s the network generated over the last few seconds
    GET /assets/...  the page's CSS and JavaScript (web/static; no CDN, no build step)

The page is plain HTML plus one script; it talks to the same API any client uses, with the API key it keeps
in the browser's localStorage (sent as ``Authorization: Bearer``). /network needs no key: it shows what the
directory already tells every worker (ids, devices, memory, held spans), never wallets or worker URLs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, render_template

from azu.errors import AzuError, ServiceUnavailable
from azu.network import directory, keys, placement
from azu.registry import status as shard_status
from web import redis_client

bp = Blueprint("pages", __name__, static_folder="static", static_url_path="/assets",
               template_folder="templates")
ANSWERS = "azu.pages.network"  # app.extensions: this app's /network answer cache and tokens/s samples

# The page runs only its own files: no inline script or style, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

THROUGHPUT_WINDOW_S = 10.0  # tokens/s is measured over (about) this many seconds
MIN_SAMPLE_GAP_S = 0.5  # two samples closer than this give no rate (too noisy)
ANSWER_TTL_S = 1.0  # /network recomputes at most once a second per process, however often it is polled
MAX_JOBS_SAMPLED = 5000  # a sample reads at most this many active jobs' step counters


@bp.get("/")
def index() -> Response:
    resp = Response(render_template("index.html"), mimetype="text/html")
    resp.headers.update(PAGE_HEADERS)
    return resp


@bp.get("/network")
def network():
    try:
        return jsonify(current_app.extensions[ANSWERS].get(redis_client()))
    except redis.RedisError:
        raise ServiceUnavailable("the network directory (Redis) cannot be reached") from None


# --- what /network answers ---------------------------------------------------------------------------------
def network_view(r: redis.Redis, throughput: Throughput) -> dict[str, Any]:
    now = time.time()
    workers = directory.live_workers(r, now=now)
    model_ids = sorted(set(shard_status.ready_models(r)) | {m for w in workers for m, _ in w.stages})
    models = []
    for model_id in model_ids:
        try:
            num_layers: int | None = shard_status.model_info(r, model_id).num_layers
        except AzuError:  # held by a worker but not (or no longer) ready here
            num_layers = None
        holders = [{"worker_id": w.worker_id, **_span_json(span)}
                   for w in workers for span in w.holds(model_id)]
        served = bool(num_layers and placement.Routes(model_id, num_layers, workers).exists())
        models.append({"model_id": model_id, "num_layers": num_layers, "served": served, "holders": holders})
    rate = throughput.measure(r, now=now)
    return {
        "workers": [{
            "worker_id": w.worker_id,
            "device": w.device,
            "total_memory": w.total_memory,
            "free_memory": w.free_memory,
            "cached_jobs": w.cached_jobs,
            "heartbeat_age_s": round(max(0.0, now - w.heartbeat_at), 1),
            "stages": [{"model_id": m, **_span_json(span)} for m, span in w.stages],
        } for w in workers],
        "models": models,
        "active_jobs": rate.active_jobs,
        "tokens_per_s": None if rate.tokens_per_s is None else round(rate.tokens_per_s, 2),
        "window_s": None if rate.window_s is None else round(rate.window_s, 1),
        "generated_at": round(now, 3),
    }


def _span_json(span: Any) -> dict[str, Any]:
    return {"first": span.first, "last": span.last, "embeddings": span.embeddings, "head": span.head,
            "label": str(span)}


# --- tokens/s ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rate:
    tokens_per_s: float | None  # None until two samples at least MIN_SAMPLE_GAP_S apart exist
    window_s: float | None
    active_jobs: int


class Throughput:
    """Tokens/s from what the core already records: each job's step counter (``step`` in ``azu:job:<id>``,
    one per generated token, written with the token's event) and the active job list.

    Each measurement samples the step counter of every active job; the rate is the steps gained since the
    oldest sample of the last THROUGHPUT_WINDOW_S seconds, divided by the time between them, over every job
    seen in any sample since (a job that ended meanwhile still counts: its counter stays in its hash for a
    day). A job that started and ended entirely between two measurements is missed: the page polls every 3 s.
    Samples live in this process (each gunicorn process measures on its own); nothing is written to Redis.
    """

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._lock = threading.Lock()

    def measure(self, r: redis.Redis, *, now: float | None = None) -> Rate:
        now = time.time() if now is None else now
        active = [keys.as_str(j) for j in r.zrange(keys.ACTIVE_JOBS, 0, MAX_JOBS_SAMPLED - 1)]  # type: ignore[union-attr]
        with self._lock:
            while self._samples and now - self._samples[0][0] > self.window_s:
                self._samples.popleft()
            base = self._samples[0] if self._samples else None
            # Every job seen since the base sample: one that ended since is still counted (its counter stays).
            wanted = sorted(set(active).union(*(sample for _, sample in self._samples)))
            steps = _steps(r, wanted)
            sample = {j: steps[j] for j in active if j in steps}
            if not self._samples or now - self._samples[-1][0] >= MIN_SAMPLE_GAP_S:
                self._samples.append((now, sample))
        if base is None or now - base[0] < MIN_SAMPLE_GAP_S:
            return Rate(None, None, len(active))
        then, before = base
        # A job absent from the base sample started after it: all its steps are new.
        gained = sum(max(0, steps.get(j, before.get(j, 0)) - before.get(j, 0)) for j in wanted)
        return Rate(gained / (now - then), now - then, len(active))


def _steps(r: redis.Redis, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(keys.job(job_id), "step")
    out = {}
    for job_id, raw in zip(job_ids, pipe.execute(), strict=True):
        if raw is not None:
            try:
                out[job_id] = int(keys.as_str(raw))
            except ValueError:
                continue
    return out


class _Answers:
    """The last /network answer of this process, reused for ANSWER_TTL_S: polling costs Redis little."""

    def __init__(self) -> None:
        self.throughput = Throughput()
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def get(self, r: redis.Redis) -> dict[str, Any]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < ANSWER_TTL_S:
                return self._cached[1]
            answer = network_view(r, self.throughput)
            self._cached = (time.monotonic(), answer)
            return answer


@bp.record_once
def _setup(state: Any) -> None:
    state.app.extensions[ANSWERS] = _Answers()
