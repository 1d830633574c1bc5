"""The page's routes without a browser: ``/`` and its assets (local only, locked down by a CSP), and the
``/network`` view (live workers, held spans, tokens/s from the jobs' step counters) over a real Redis."""

from __future__ import annotations

import time

import pytest
import redis

from azu.network import keys
from tests.web.support import MODEL_ID, with_pages
from web.pages import Throughput


def test_page_and_assets_are_served_locally_under_a_strict_csp(app):
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # nothing from another origin
    for asset, kind in (("/assets/app.js", "text/javascript"), ("/assets/app.css", "text/css"),
                        ("/assets/favicon.svg", "image/svg+xml")):
        assert asset in html
        resp = client.get(asset)
        assert resp.status_code == 200 and resp.mimetype == kind, asset
        resp.close()
    assert "<script>" not in html and " style=" not in html and " on" + "click=" not in html


def test_network_lists_live_workers_and_who_holds_which_layers(app, directory_workers, registry_dir, r):
    from azu.registry import status as shard_status

    shard_status.mark_ready(r, MODEL_ID, source=MODEL_ID)
    body = app.test_client().get("/network").get_json()
    assert [w["worker_id"] for w in body["workers"]] == ["w-embed", "w-head"]
    assert body["workers"][0]["stages"] == [{"model_id": MODEL_ID, "first": 0, "last": 4, "embeddings": True,
                                             "head": False, "label": "embeddings + layers [0, 4)"}]
    assert "wallet" not in body["workers"][0] and "p2p_url" not in body["workers"][0]
    [model] = body["models"]
    assert model["model_id"] == MODEL_ID and model["num_layers"] == 8 and model["served"] is True
    assert [(h["worker_id"], h["first"], h["last"]) for h in model["holders"]] == [("w-embed", 0, 4),
                                                                                  ("w-head", 4, 8)]
    assert body["active_jobs"] == 0 and body["tokens_per_s"] is None  # one sample: no rate yet


def test_network_without_workers_says_so_and_a_model_without_a_route_is_not_served(app, registry_dir, r):
    from azu.registry import status as shard_status

    shard_status.mark_ready(r, MODEL_ID, source=MODEL_ID)
    body = app.test_client().get("/network").get_json()
    assert body["workers"] == []
    assert body["models"] == [{"model_id": MODEL_ID, "num_layers": 8, "served": False, "holders": []}]


def _job(r: redis.Redis, job_id: str, step: int, *, active: bool = True) -> None:
    r.hset(keys.job(job_id), mapping={"step": str(step)})
    if active:
        r.zadd(keys.ACTIVE_JOBS, {job_id: time.time()})
    else:
        r.zrem(keys.ACTIVE_JOBS, job_id)


def test_tokens_per_second_counts_steps_gained_including_jobs_that_ended_or_started(clean_redis):
    r = clean_redis
    meter = Throughput(window_s=10.0)
    t0 = 1_000_000.0
    _job(r, "job-a", 5)
    first = meter.measure(r, now=t0)
    assert first.tokens_per_s is None and first.active_jobs == 1

    _job(r, "job-a", 25)  # +20
    _job(r, "job-b", 10)  # new since the first sample: +10
    second = meter.measure(r, now=t0 + 2)
    assert second.tokens_per_s == pytest.approx(30 / 2) and second.active_jobs == 2

    _job(r, "job-a", 30, active=False)  # ended since: still counted, from the base sample's 5
    _job(r, "job-b", 16)  # seen only in the second sample; its counter keeps counting
    third = meter.measure(r, now=t0 + 4)
    assert third.tokens_per_s == pytest.approx(((30 - 5) + 16) / 4) and third.active_jobs == 1

    # Samples older than the window are dropped: the rate is over the last window only (from t0 + 4).
    fourth = meter.measure(r, now=t0 + 13)
    assert fourth.window_s == pytest.approx(9) and fourth.tokens_per_s == pytest.approx(0)


def test_network_answers_503_when_redis_is_down(registry_dir):
    from azu.billing.base import FreeBilling
    from azu.cli.up import free_port
    from web import create_app

    app = with_pages(create_app({"TESTING": True, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                 "AZU_BILLING": FreeBilling()}))
    resp = app.test_client().get("/network")
    assert resp.status_code == 503
    err = resp.get_json()["error"]  # {"error": {...}} (one shape everywhere) or {"error": "...", ...}
    message = err["message"] if isinstance(err, dict) else err
    assert "Redis" in message
