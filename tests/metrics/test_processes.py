"""Metrics across real processes: the API under gunicorn with two worker processes counting into one
/metrics (prometheus_client's multiprocess mode), the scheduler, and a worker node (azu-worker, a stranger
that enrolls) serving its own step counters on AZU_METRICS_PORT after a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from azu.cli.processes import ProcessGroup, celery_argv, gunicorn_argv
from azu.cli.up import free_port
from tests.support import REPO, wait_for
from tests.support.api import CORE_SEED, MODEL_ID

pytestmark = [pytest.mark.slow, pytest.mark.network]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def stack(metrics_redis_url: str, metrics_registry_dir: Path, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from azu.network import directory
    from azu.registry import status as models

    root = tmp_path_factory.mktemp("metrics-stack")
    r = redis.Redis.from_url(metrics_redis_url)
    r.flushdb()
    multiproc = root / "prom"
    multiproc.mkdir()  # empty at start: files of an earlier run would be counted again
    api_port, worker_port = free_port(), free_port()
    base = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "AZU_METRICS_TOKEN")}
    env.update(REDIS_URL=metrics_redis_url, AZU_REGISTRY_DIR=str(metrics_registry_dir), REGISTRY_URL=base,
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), AZU_HEARTBEAT_S="1",
               AZU_HEARTBEAT_TTL_S="10", AUTH_SECRET_KEY=CORE_SEED)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with pytest.MonkeyPatch.context() as mp:  # shard_dir reads AZU_REGISTRY_DIR at call time
        mp.setenv("AZU_REGISTRY_DIR", str(metrics_registry_dir))
        models.mark_ready(r, MODEL_ID, source="test")  # the registry state the shard task would leave
    group = ProcessGroup()
    logs = root / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str], extra: dict[str, str]) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            group.start(name, argv, env=dict(env, **extra), stdout=log, stderr=subprocess.STDOUT,
                        cwd=str(REPO))

    def tail() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in logs.glob("*.log"))

    try:
        start("api", gunicorn_argv("web:create_app()", host="127.0.0.1", port=api_port, workers=2, threads=4),
              {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
        start("scheduler", celery_argv("core", name="scheduler", pool="solo", beat=True), {})
        start("worker", [sys.executable, "-m", "azu.cli.processes", "worker", "--core-url", base,
                         "--worker-id", "m1"],
              {"AZU_METRICS_PORT": str(worker_port), "AZU_CACHE_DIR": str(root / "cache"),
               "AZU_WORKER_KEY_FILE": str(root / "keys" / "m1.key")})

        def up() -> bool:
            dead = group.first_exited()
            if dead is not None:
                pytest.fail(f"{dead.name} exited ({dead.proc.returncode}):\n{tail()}")
            try:
                healthy = requests.get(base + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
            return healthy and "m1" in {w.worker_id for w in directory.live_workers(r)}

        wait_for(up, timeout=240, what="the API, the scheduler and worker m1", interval=0.2)
        yield {"base": base, "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics", "prom": multiproc,
               "r": r, "tail": tail}
    finally:
        group.stop()


def test_two_gunicorn_processes_count_into_one_metrics(stack) -> None:
    base, prom = stack["base"], stack["prom"]

    def healthz_counts() -> dict[str, float]:
        """Per process file: how many /healthz answers it counted."""
        out = {}
        for path in prom.glob("counter_*.db"):
            total = 0.0
            for key, val, *_ in MmapedDict.read_all_values_from_file(str(path)):
                _metric, sample, labels, *_ = json.loads(key)
                if sample == "azu_api_requests_total" and labels.get("route") == "/healthz":
                    total += val
            out[path.name] = total
        return out

    before = sum(healthz_counts().values())  # the fixture's own readiness checks
    sent = 0

    def both_counted() -> bool:
        nonlocal sent
        with ThreadPoolExecutor(8) as pool:  # concurrent fresh connections reach both processes
            codes = list(pool.map(lambda _: requests.get(base + "/healthz", timeout=10,
                                                         headers={"Connection": "close"}).status_code,
                                  range(16)))
        assert codes == [200] * 16
        sent += 16
        return sum(1 for n in healthz_counts().values() if n > 0) >= 2

    wait_for(both_counted, timeout=60, what="both gunicorn processes to answer /healthz", interval=0.0)
    counted = healthz_counts()
    # /metrics (whichever process answers) sums both processes' files.
    found = samples(requests.get(base + "/metrics", timeout=10).text)
    shown = value(found, "azu_api_requests_total", route="/healthz", method="GET", status="200")
    assert shown == before + sent
    assert sum(counted.values()) == before + sent


def test_a_job_moves_worker_api_and_core_metrics(stack) -> None:
    base, r = stack["base"], stack["r"]
    auth = {"Authorization": "Bearer any-key"}  # FreeBilling: every key is the local user
    resp = requests.post(base + "/submit", json={"model_id": MODEL_ID, "prompt": "hello", "max_tokens": 5},
                         headers=auth, timeout=30)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]

    def done() -> Any:
        view = requests.get(base + f"/results/{job_id}", headers=auth, timeout=10).json()
        assert view["status"] not in ("failed",), f"{view}\n{stack['tail']()}"
        return view if view["status"] == "done" else None

    view = wait_for(done, timeout=120, what=f"job {job_id}", interval=0.1)
    generated = len(view["token_ids"])
    with requests.post(base + "/v1/chat/completions", headers=auth, stream=True, timeout=60,
                       json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 3, "stream": True}) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    # An error event also ends with [DONE]: the stream must have finished its answer, with no error.
    assert any(b'"finish_reason":"' in line for line in lines), f"{lines}\n{stack['tail']()}"

    # The worker's own port: steps of the job (prefill, then decode), batch sizes, step latency.
    worker = samples(requests.get(stack["worker_metrics"], timeout=10).text)
    assert value(worker, "azu_worker_steps_total", phase="prefill") >= 2
    assert value(worker, "azu_worker_steps_total", phase="decode") >= generated - 1
    assert value(worker, "azu_worker_batch_size_count") >= 2
    assert value(worker, "azu_worker_step_duration_seconds_count") >= 2
    assert ("azu_worker_kv_cache_bytes", ()) in worker and ("azu_worker_cached_jobs", ()) in worker

    def api_figures() -> Any:
        found = samples(requests.get(base + "/metrics", timeout=10).text)
        settled = value(found, "azu_core_settlements_total", outcome="settled")
        return found if settled >= 2 else None

    found = wait_for(api_figures, timeout=60, what="both jobs to be settled", interval=0.1)
    assert value(found, "azu_api_jobs_started_total", route="submit") == 1
    assert value(found, "azu_api_jobs_started_total", route="chat_stream") == 1
    assert value(found, "azu_api_time_to_first_token_seconds_count", route="chat_stream") == 1
    assert value(found, "azu_core_time_to_first_token_seconds_count") == 2
    assert value(found, "azu_core_tokens_generated_total") >= generated
    assert value(found, "azu_core_reports_total", kind="token", outcome="accepted") >= generated
    assert value(found, "azu_core_reports_total", kind="heartbeat", outcome="accepted") >= 1
    assert value(found, "azu_core_workers_live") == 1
    assert r.exists("azu:metrics:azu_core_settlements")
