"""The API's counters over real HTTP (werkzeug's server, a real Redis): requests, refusals by code and the
core's figures move, and /metrics parses as Prometheus text."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import make_server


def scrape(base: str, **kw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(base + "/metrics", timeout=10, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(metrics_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, redis.Redis]]:
    from azu.billing.base import FreeBilling
    from web import create_app

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("AZU_METRICS_TOKEN", raising=False)
    monkeypatch.setenv("AZU_RATE_LIMIT_JOBS", "2/minute")
    r = redis.Redis.from_url(metrics_redis_url)
    r.flushdb()
    app = create_app({"REDIS_URL": metrics_redis_url, "AZU_BILLING": FreeBilling()})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", r
    finally:
        server.shutdown()
        server.server_close()


def test_requests_and_refusals_are_counted(served) -> None:
    base, _r = served
    before = scrape(base)
    for _ in range(3):
        assert requests.get(base + "/healthz", timeout=10).status_code == 200
    assert requests.get(base + "/no/such/route", timeout=10).status_code == 404
    body = {"model_id": "nobody/none", "prompt": "hi", "max_tokens": 4}
    answers = [requests.post(base + "/submit", json=body, timeout=10).status_code for _ in range(3)]
    assert answers == [404, 404, 429]
    after = scrape(base)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("azu_api_requests_total", route="/healthz", method="GET", status="200") == 3
    assert delta("azu_api_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta("azu_api_requests_total", route="/submit", method="POST", status="404") == 2
    assert delta("azu_api_requests_total", route="/submit", method="POST", status="429") == 1
    assert delta("azu_api_refusals_total", status="404", code="not_found") == 3
    assert delta("azu_api_refusals_total", status="429", code="too_many_requests") == 1
    assert delta("azu_api_request_duration_seconds_count", route="/healthz", method="GET") == 3
    # No job was started: a refused request starts nothing.
    assert delta("azu_api_jobs_started_total", route="submit") == 0
    # The job id never becomes a label: routes are templates.
    assert all("job-" not in v for (_n, labels) in after for _k, v in labels)


def test_core_figures_come_from_redis(served) -> None:
    """A forged report refused by the collector, a watchdog action and a settlement show up at once."""
    from azu import metrics
    from azu.network import keys, watchdog
    from azu.network.collector import Collector
    from tests.support.network import Recording

    base, r = served

    class NoDispatch:
        def send_task(self, *a: Any, **k: Any) -> None:
            return None

    taken = Collector(r, dispatch=Recording(NoDispatch())).process([b"not a report", b"\x93\x01\x02\x03"])
    assert taken == 0
    # A running job idle past its deadline: the watchdog fails it (for real, on this Redis).
    r.hset(keys.job("job-stale"), mapping={"status": "running", "updated": "1", "model_id": "m",
                                           "user_id": "u", "step": "0"})
    r.zadd(keys.ACTIVE_JOBS, {"job-stale": 1})
    assert watchdog.tick(r, step_deadline_s=1.0, dispatch=NoDispatch()) == ["job-stale"]
    metrics.CORE_SETTLEMENTS.inc(r, outcome="released")
    samples = scrape(base)
    assert value(samples, "azu_core_reports_total", kind="unverified", outcome="refused") == 2
    assert value(samples, "azu_core_watchdog_actions_total", action="fail_stalled") == 1
    assert value(samples, "azu_core_settlements_total", outcome="released") == 1
    assert value(samples, "azu_core_workers_live") == 0
    assert value(samples, "azu_core_scrape_ok") == 1


def test_metrics_token(served, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _r = served
    monkeypatch.setenv("AZU_METRICS_TOKEN", "s3cret-token")
    resp = requests.get(base + "/metrics", timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(base + "/metrics", timeout=10,
                        headers={"Authorization": "Bearer wrong"}).status_code == 401
    samples = scrape(base, headers={"Authorization": "Bearer s3cret-token"})
    assert value(samples, "azu_core_scrape_ok") == 1


def test_redis_down_still_answers(metrics_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's figures are missing (azu_core_scrape_ok 0), the process's own counts still answer."""
    from azu.billing.base import FreeBilling
    from azu.cli.up import free_port
    from web import create_app

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("AZU_METRICS_TOKEN", raising=False)
    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "AZU_BILLING": FreeBilling()})
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(resp.get_data(as_text=True)) for s in fam.samples}
    assert value(samples, "azu_core_scrape_ok") == 0


@pytest.mark.parametrize(("events", "timed"), [
    ([{"k": "token", "t": "7"}, {"k": "done", "t": "", "reason": "stop"}], 1),
    # The first token is a stop id: the answer ends at once and the token is never shown.
    ([{"k": "done", "t": "", "reason": "stop"}], 1),
    # Cancelled before any token: there is no first token to time.
    ([{"k": "done", "reason": "cancelled"}], 0),
], ids=["token-first", "stop-token-first", "cancelled-before-a-token"])
def test_a_stream_times_its_first_token_once(metrics_redis_url: str, metrics_registry_dir,
                                             events: list[dict[str, str]], timed: int) -> None:
    """The API's time to first token counts every streamed answer with a token once, also one that a stop id
    ends at once (the core counts that one at its step 0: the two counts must agree)."""
    from azu import metrics, serving
    from azu.network import keys
    from azu.tokenization import load_tokenizer
    from tests.support.api import MODEL_ID
    from web.openai import _Head, _stream

    r = redis.Redis.from_url(metrics_redis_url)
    job_id = f"ttft-{len(events)}-{timed}"
    r.delete(keys.events(job_id))
    for step, fields in enumerate(events):
        r.xadd(keys.events(job_id), fields, id=f"0-{step + 1}")
    folder = metrics_registry_dir / MODEL_ID
    model = serving.ReadyModel(model_id=MODEL_ID, folder=folder, tokenizer=load_tokenizer(folder),
                               num_layers=2, context_length=None)
    sampling = serving.Sampling(temperature=0.0, top_p=1.0, top_k=0, seed=0)
    head = _Head(id="chatcmpl-1", created=0, model=MODEL_ID, job_id=job_id, results_url="/results/x")
    count = metrics.API.get_sample_value
    before = count("azu_api_time_to_first_token_seconds_count", {"route": "chat_stream"}) or 0.0
    chunks = list(_stream(r, job_id, head, model, sampling, prompt_tokens=1, include_usage=False,
                          timeout_s=10, started=0.0))
    assert chunks[-1] == "data: [DONE]\n\n" and f'"finish_reason":"{events[-1]["reason"]}"' in chunks[-2]
    after = count("azu_api_time_to_first_token_seconds_count", {"route": "chat_stream"}) or 0.0
    assert after == before + timed
