"""``azu up`` from nothing: it starts its own Redis and PostgreSQL, builds and shards the demo model, runs
API, scheduler, registry and two workers, answers, writes .azu/local.json; Ctrl-C stops every process.

As a supervisor: a SIGKILLed worker is started again and the network answers again; a SIGKILLed scheduler
leaves no beat behind; a second azu up on the same port changes nothing; SIGHUP stops everything; Ctrl-C
while it starts stops everything started so far."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from azu.cli.up import DEMO_MODEL_ID, free_port
from tests.support import REPO, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """The demo model azu up builds, built once for the tests that need not watch it being built (the first
    test does, from nothing): copied into their state dirs, azu up takes it as built earlier."""
    from azu.cli.demo import build_demo_model  # what `azu demo-model` runs, in this process (torch is here)

    return build_demo_model(tmp_path_factory.mktemp("demo") / DEMO_MODEL_ID)


def _seed_demo_model(tmp_path: Path, demo_model: Path) -> None:
    shutil.copytree(demo_model, tmp_path / ".azu" / "models" / DEMO_MODEL_ID)


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
        # Its own steps, not the embedded PostgreSQL's or the migrations' internals (initdb's whole output,
        # each pg_ctl command line, alembic's plugins).
        assert "Running commandline" not in output and "setup plugin" not in output
        assert "XDG_RUNTIME_DIR" not in output
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
    # Stopped in order, Redis after the rest: no worker lost its broker on the way out.
    for worker_log in (tmp_path / ".azu" / "logs").glob("worker-*.log"):
        text = worker_log.read_text(errors="replace")
        assert "Couldn't ack" not in text and "ConnectionError" not in text, text[-3000:]

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


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "DATABASE_URL", "REGISTRY_URL",
                        "AZU_REGISTRY_DIR", "AUTH_SECRET_KEY")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _start_up(tmp_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "azu.cli", "up", "--port", str(port),
                                 "--workers", "2"],
                                cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def _tree(root_pid: int, pgdata: Path) -> list[psutil.Process]:
    """Every process ``root_pid`` started (and theirs), plus the PostgreSQL of ``pgdata`` and its backends."""
    out = psutil.Process(root_pid).children(recursive=True)
    try:
        pg = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        out += [pg, *pg.children(recursive=True)]
    except (FileNotFoundError, ValueError, IndexError, psutil.Error):
        pass
    return out


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return out


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie not reaped yet
        return ""


def _ours(info: dict[str, Any], needle: str) -> list[psutil.Process]:
    """Processes anywhere on the machine (orphans too) whose command line has ``needle`` and whose
    environment is this network's (its Redis login)."""
    found = []
    for p in psutil.process_iter():
        try:
            if needle in " ".join(p.cmdline()) and p.environ().get("REDIS_URL") == info["redis_url"]:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _stop(up: subprocess.Popen[bytes]) -> None:
    """A failed test still stops the network it started (SIGINT first: SIGKILL would orphan it all)."""
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def _chat(info: dict[str, Any], timeout: float = 120) -> requests.Response:
    return requests.post(info["base_url"] + "/v1/chat/completions", timeout=timeout,
                         headers={"Authorization": f"Bearer {info['api_key']}"},
                         json={"model": info["model"], "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 6, "temperature": 0})


def test_azu_up_restarts_what_dies_and_sighup_stops_everything(tmp_path, demo_model):
    port = free_port()
    log = tmp_path / "up.log"
    _seed_demo_model(tmp_path, demo_model)
    up = _start_up(tmp_path, port, log)
    info_path = tmp_path / ".azu" / "local.json"
    everything: list[psutil.Process] = []
    try:
        def ready() -> bool:
            if up.poll() is not None:
                pytest.fail(f"azu up exited with {up.returncode}:\n{log.read_text()[-4000:]}")
            return info_path.is_file()

        wait_for(ready, timeout=300, what="azu up to write .azu/local.json", interval=0.25)
        info = json.loads(info_path.read_text())
        first_info = info_path.read_bytes()
        assert "(built earlier)" in log.read_text()  # the demo model in the state dir was taken as it was

        # A second azu up on the same port (and state dir) refuses, touching nothing of the first's.
        second = subprocess.run([sys.executable, "-m", "azu.cli", "up", "--port", str(port)], cwd=tmp_path,
                                env=_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert info_path.read_bytes() == first_info
        assert up.poll() is None

        # SIGKILL a worker: it is started again (enrolling again with its key) and the network answers.
        killed = psutil.Process(info["processes"]["worker-local-0"])
        assert "gpu.local-0" in " ".join(killed.cmdline())
        killed.send_signal(signal.SIGKILL)

        def worker_back() -> psutil.Process | None:
            # (a worker runs with its own broker login, not the core's: found as azu up's child)
            new = [p for p in psutil.Process(up.pid).children()
                   if "gpu.local-0" in _cmd(p) and p.pid != killed.pid]
            return new[0] if new else None

        back = wait_for(worker_back, timeout=120, what="the worker to be started again", interval=0.2)
        assert back.ppid() == up.pid
        assert "local-0 exited with code -9; starting it again" in log.read_text()

        # It enrolled again with the same key (a fresh broker login comes with every enrollment).
        worker_log_path = tmp_path / ".azu" / "logs" / "worker-local-0.log"
        wait_for(lambda: worker_log_path.read_text().count("enrolled as local-0") == 2, timeout=60,
                 what="the worker to enroll again", interval=0.2)
        worker_log = worker_log_path.read_text()
        keys = {line.split("key ")[1].split(" ")[0] for line in worker_log.splitlines()
                if line.startswith("azu-worker: worker id local-0")}
        assert len(keys) == 1

        # SIGKILL the scheduler: it is started again, and the one beat (its own supervised process) is
        # still the only one: no orphan beat ticking twice.
        beats = _ours(info, " workers beat ")
        assert len(beats) == 1 and beats[0].ppid() == up.pid
        scheduler = psutil.Process(info["processes"]["scheduler"])
        scheduler.send_signal(signal.SIGKILL)
        wait_for(lambda: [p for p in _ours(info, "-Q core") if p.pid != scheduler.pid and p.ppid() == up.pid],
                 timeout=60, what="the scheduler to be started again", interval=0.2)
        assert [p.pid for p in _ours(info, " workers beat ")] == [beats[0].pid]

        everything = _tree(up.pid, tmp_path / ".azu" / "pgdata")
        names = " ".join(_cmd(p) for p in everything)
        assert "redis-server" in names and "postgres" in names
        # The terminal closed: SIGHUP stops everything, like Ctrl-C.
        up.send_signal(signal.SIGHUP)
        assert up.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        _stop(up)
    try:
        wait_for(lambda: not _alive(everything), timeout=10, what="every process azu up started to exit",
                 interval=0.1)
    finally:
        assert not _alive(everything), _alive(everything)
    assert "stopped" in log.read_text()
    assert not info_path.exists()


def test_ctrl_c_while_starting_the_registry_stops_everything(tmp_path, demo_model):
    port = free_port()
    log = tmp_path / "up.log"
    _seed_demo_model(tmp_path, demo_model)
    up = _start_up(tmp_path, port, log)
    try:
        wait_for(lambda: up.poll() is not None or "starting the registry" in log.read_text(), timeout=300,
                 what="azu up to start the registry", interval=0.05)
        assert up.poll() is None, log.read_text()[-3000:]
        everything = _tree(up.pid, tmp_path / ".azu" / "pgdata")
        assert len(everything) >= 4  # redis, PostgreSQL, the scheduler, its beat, the collector...
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 130, log.read_text()[-3000:]
    finally:
        _stop(up)
    output = log.read_text()
    assert "failed: KeyboardInterrupt" in output and "stopped" in output
    try:
        wait_for(lambda: not _alive(everything), timeout=10, what="every process azu up started to exit",
                 interval=0.1)
    finally:
        assert not _alive(everything), _alive(everything)
    assert not (tmp_path / ".azu" / "local.json").exists()
