"""``azu up`` from nothing: it starts its own Redis and PostgreSQL, builds and shards the demo model, runs
API, scheduler, registry and two workers, answers, writes .azu/local.json; Ctrl-C stops every process."""

from __future__ import annotations

import json
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


def test_azu_up_serves_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    # Nothing set up by hand: no Redis, no database, no registry from the environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "DATABASE_URL", "REGISTRY_URL",
                        "AZU_REGISTRY_DIR", "AUTH_SECRET_KEY")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "azu.cli", "up", "--port", str(port), "--workers", "2"],
                              cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    info_path = tmp_path / ".azu" / "local.json"
    everything: list[psutil.Process] = []
    try:
        def ready() -> bool:
            if up.poll() is not None:
                pytest.fail(f"azu up exited with {up.returncode}:\n{log.read_text()[-4000:]}")
            return info_path.is_file()

        wait_for(ready, timeout=300, what="azu up to write .azu/local.json", interval=0.25)
        info = json.loads(info_path.read_text())
        output = log.read_text()
        for step in ("starting redis... ok", "starting the API... ok", "answering a sample prompt... ok"):
            assert step in output
        assert info["api_key"] in output and info["base_url"] in output
        assert info["base_url"] == f"http://127.0.0.1:{port}"
        assert len(info["workers"]) == 2

        # Every process it started, and theirs (gunicorn and Celery children, PostgreSQL's backends).
        root = psutil.Process(up.pid)
        everything = root.children(recursive=True)
        if info.get("postgres_pid"):
            pg = psutil.Process(info["postgres_pid"])
            everything += [pg, *pg.children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in everything)
        assert "redis-server" in names and "gunicorn" in names and names.count("gpu.local-") == 2

        headers = {"Authorization": f"Bearer {info['api_key']}"}
        resp = requests.post(info["base_url"] + "/v1/chat/completions", headers=headers, timeout=120, json={
            "model": info["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["usage"]["completion_tokens"] >= 1
        # The answer crossed both workers' queues.
        assert set(body["usage"]["workers"]) == set(info["workers"])
        # The key is a real one: a wrong key is refused (with the ledger) or, without one, any key works.
        wrong = requests.get(info["base_url"] + "/v1/models", headers={"Authorization": "Bearer nope"},
                             timeout=10)
        assert wrong.status_code == (401 if info["database_url"] else 200)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
            pytest.fail(f"azu up did not stop on SIGINT:\n{log.read_text()[-3000:]}")

    assert up.returncode == 0, log.read_text()[-3000:]
    assert "stopped" in log.read_text()

    def alive() -> list[str]:
        out = []
        for p in everything:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid} {' '.join(p.cmdline())}")
            except psutil.NoSuchProcess:
                pass
        return out

    # A process reparented to init may be reaped a moment after azu up returned.
    try:
        wait_for(lambda: not alive(), timeout=10, what="every process azu up started to exit", interval=0.1)
    finally:
        assert not alive(), alive()
    assert not info_path.exists()  # no stale file pointing at a network that is gone
