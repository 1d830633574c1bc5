"""The service entry points run the real servers: ``azu-core`` serves the API and the registry routes on
their ports and stops every child on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from azu.cli.up import free_port
from tests.support import REPO, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_core_serves_api_and_registry_then_stops_on_sigterm(tmp_path, redis_url, registry_dir):
    api_port, registry_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(REDIS_URL=redis_url, AZU_REGISTRY_DIR=str(registry_dir), PYTHONPATH=str(REPO),
               REGISTRY_URL=f"http://127.0.0.1:{registry_port}", OMP_NUM_THREADS="1")
    with open(tmp_path / "core.log", "wb") as log:
        core = subprocess.Popen([sys.executable, "-m", "azu.cli.processes", "core", "--host", "127.0.0.1",
                                 "--port", str(api_port), "--registry-host", "127.0.0.1",
                                 "--web-workers", "1", "--pool", "solo"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        api, registry = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{registry_port}"

        def both_up() -> bool:
            assert core.poll() is None, (tmp_path / "core.log").read_text()[-3000:]
            return _up(api) and _up(registry)

        wait_for(both_up, timeout=90, what="azu-core's API and registry", interval=0.1)
        status = requests.get(f"{registry}/models/status", params={"model_id": "azu-demo"}, timeout=10)
        assert status.status_code == 200 and status.json()["state"] == "ready"
        assert requests.get(f"{api}/v1/models", timeout=10).json()["data"][0]["id"] == "azu-demo"
        # The registry process serves only the registry: no job routes there.
        assert requests.post(f"{registry}/submit", json={}, timeout=10).status_code == 404
        children = psutil.Process(core.pid).children(recursive=True)
        cmdlines = []
        for child in children:  # one may exit between the listing and its reading (a short-lived helper)
            with contextlib.suppress(psutil.NoSuchProcess):  # ZombieProcess included
                cmdlines.append(" ".join(child.cmdline()))
        # The beat is a process of its own next to the scheduler's worker, not the worker's child.
        assert any("-Q core" in c for c in cmdlines) and not any("--beat" in c for c in cmdlines)
        assert sum(" workers beat " in c for c in cmdlines) == 1
        assert any("-Q registry" in c for c in cmdlines)
        assert sum("gunicorn" in c for c in cmdlines) >= 2
    finally:
        core.send_signal(signal.SIGTERM)
        core.wait(timeout=60)

    def alive() -> list[int]:
        out = []
        for p in children:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    wait_for(lambda: not alive(), timeout=10, what="azu-core's children to exit", interval=0.1)
