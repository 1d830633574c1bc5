"""Whole networks for the API tests (tests/api): the API over gunicorn (which also serves the registry's
files), the scheduler and N worker processes, started for real against a private Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from azu.cli.processes import ProcessGroup, celery_argv, gunicorn_argv
from azu.cli.up import free_port, split_budget
from tests.support import REPO, wait_for

MODEL_ID = "azu-demo"


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


CORE_SEED = "5e" * 32  # the core's signing key in these tests (core processes only)


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
               AZU_HEARTBEAT_S="1", AZU_HEARTBEAT_TTL_S="10", AUTH_SECRET_KEY=CORE_SEED)
    group = ProcessGroup()

    def start(name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            group.start(name, argv, env=dict(env, **(extra or {})), stdout=log, stderr=subprocess.STDOUT,
                        cwd=str(REPO))

    budget = split_budget(registry_dir / MODEL_ID, n_workers)
    worker_ids = [f"w{n_workers}-{i}" for i in range(n_workers)]
    try:
        start("api", gunicorn_argv("web:create_app()", host="127.0.0.1", port=port, workers=1))
        start("scheduler", celery_argv("core", name="scheduler", pool="solo", beat=True))
        for wid in worker_ids:
            # A stranger: azu-worker enrolls at the API and runs with the broker login it gets there; it
            # drops every core variable (AUTH_SECRET_KEY, the core REDIS_URL...) before Celery starts.
            start(f"worker-{wid}", [sys.executable, "-m", "azu.cli.processes", "worker",
                                    "--core-url", base_url, "--worker-id", wid],
                  {"AZU_MEMORY_BYTES": str(budget), "AZU_CACHE_DIR": str(root / "cache" / wid),
                   "AZU_WORKER_KEY_FILE": str(root / "keys" / f"{wid}.key")})

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

        wait_for(up, timeout=240, what=f"the API and {n_workers} workers", interval=0.2)
    except BaseException:
        group.stop()
        raise
    return Network(base_url=base_url, worker_ids=worker_ids, redis=r, group=group, logs=logs, env=env)
