"""The supervisor of ``azu up`` / ``azu-core`` (azu.cli.processes.ProcessGroup) with real child processes:
a child that exits is started again with backoff, one that keeps crashing is given up on, SIGHUP stops
everything; and azu up's guards: a second ``azu up`` touches nothing of a running one, stale pgserver
handles are dropped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from azu.cli import processes
from azu.cli.processes import ProcessGroup
from azu.cli.up import LOCK_FILE, lock_state_dir, prune_pg_handles
from tests.support import REPO, wait_for

CRASH = [sys.executable, "-c", "import sys; print('started', flush=True); sys.exit(3)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def _exited(group: ProcessGroup, name: str) -> bool:
    child = next(c for c in group.children if c.name == name)
    return child.proc.poll() is not None


def test_a_crashed_child_is_started_again_with_doubling_delay(tmp_path):
    group = ProcessGroup()
    log = tmp_path / "crash.log"
    crash = group.start("crash", CRASH, log=log)
    steady = group.start("steady", SLEEP)
    steady_pid = steady.proc.pid
    try:
        t = time.monotonic()
        delays = []
        for restart in range(1, 4):
            wait_for(lambda: _exited(group, "crash"), timeout=30, what="the crashing child to exit")
            assert group.supervise(now=t) is None  # noted: a restart is due after the delay
            assert crash.restart_at is not None
            delays.append(crash.restart_at - t)
            t = crash.restart_at - 0.01
            first_pid = crash.proc.pid
            group.supervise(now=t)
            assert crash.proc.pid == first_pid  # not before its delay
            t = crash.restart_at
            group.supervise(now=t)
            assert crash.restarts == restart and crash.proc.pid != first_pid
        assert delays == pytest.approx([0.5, 1.0, 2.0])
        # Its log was reopened in append mode at every start: every run's output is there.
        wait_for(lambda: log.read_text().count("started") == 4, timeout=30, what="four runs in the log")
        assert steady.proc.pid == steady_pid and steady.proc.poll() is None  # the others were left alone
    finally:
        group.stop(timeout=5)
    assert all(c.proc.poll() is not None for c in group.children)


def test_backoff_starts_over_after_a_child_stayed_up(tmp_path):
    group = ProcessGroup()
    crash = group.start("crash", CRASH)
    try:
        crash.delay = 16.0  # as after several quick crashes
        wait_for(lambda: _exited(group, "crash"), timeout=30, what="the child to exit")
        group.supervise(now=crash.started_at + processes.STABLE_S + 1)
        assert crash.restart_at == pytest.approx(crash.started_at + processes.STABLE_S + 1 + 0.5)
    finally:
        group.stop(timeout=5)


@pytest.mark.parametrize("essential", [True, False])
def test_a_child_that_keeps_crashing_is_given_up_on(tmp_path, essential, caplog):
    group = ProcessGroup()
    crash = group.start("crash", CRASH, essential=essential)
    steady = group.start("steady", SLEEP)
    try:
        t = time.monotonic()
        given_up = None
        for _ in range(processes.GIVE_UP_CRASHES):
            wait_for(lambda: _exited(group, "crash"), timeout=30, what="the crashing child to exit")
            given_up = group.supervise(now=t)
            if crash.given_up:
                break
            t = crash.restart_at
            group.supervise(now=t)
        assert crash.given_up and crash.restarts == processes.GIVE_UP_CRASHES - 1
        assert (given_up is crash) if essential else (given_up is None)
        assert "crash exited with code 3" in caplog.text and "giving up on it" in caplog.text
        # Given up on: never started again, and no longer reported as exited.
        pid = crash.proc.pid
        assert group.supervise(now=t + 1000) is None and crash.proc.pid == pid
        assert group.first_exited() is None
        assert steady.proc.poll() is None
    finally:
        group.stop(timeout=5)


def test_crashes_spread_over_more_than_the_window_are_never_given_up_on(tmp_path):
    group = ProcessGroup()
    crash = group.start("crash", CRASH)
    try:
        t = time.monotonic()
        for _ in range(processes.GIVE_UP_CRASHES + 2):
            wait_for(lambda: _exited(group, "crash"), timeout=30, what="the crashing child to exit")
            assert group.supervise(now=t) is None
            t = max(crash.restart_at or t, t + processes.GIVE_UP_WINDOW_S / 2)
            group.supervise(now=t)
            t += processes.GIVE_UP_WINDOW_S / 2
        assert not crash.given_up and crash.restarts == processes.GIVE_UP_CRASHES + 2
    finally:
        group.stop(timeout=5)


SUPERVISOR = """
import sys, time
from azu.cli.processes import ProcessGroup
group = ProcessGroup()
# a child with a child of its own (like gunicorn's or Celery's pool), and one that crashes now and then
group.start("parent", [sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    " time.sleep(600)"])
group.start("crash", [sys.executable, "-c", "import time; time.sleep(0.3)"])
print(" ".join(str(c.proc.pid) for c in group.children), flush=True)
sys.exit(group.run_until_signal(tick_s=0.5))
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_every_child_and_grandchild(tmp_path, sig):
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert sup.stdout is not None
        sup.stdout.readline()
        root = psutil.Process(sup.pid)
        # the crashing child was started again at least once, and the grandchild is there
        wait_for(lambda: len(root.children(recursive=True)) >= 3, timeout=30, what="the grandchild")
        everything = root.children(recursive=True)
        sup.send_signal(sig)
        assert sup.wait(timeout=30) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()

    def alive() -> list[int]:
        out = []
        for p in everything:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    wait_for(lambda: not alive(), timeout=10, what="every child to exit", interval=0.05)


ON_SIGTERM = """
import signal, sys, time
marks, name, linger_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
def stop(*_):
    got = time.time()
    time.sleep(linger_s)
    with open(marks, "a") as f:
        f.write(f"{name} {got} {time.time()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""
IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(600)")


def _ready(child) -> None:
    assert child.proc.stdout is not None and child.proc.stdout.readline().strip() == b"ready"


def test_services_the_others_use_are_stopped_after_them(tmp_path):
    # Told to stop, each child takes linger_s (a worker finishing its session), then writes when it got the
    # signal and when it exits.
    marks = tmp_path / "marks"
    group = ProcessGroup()

    def start(name: str, linger_s: float, **kw):
        return group.start(name, [sys.executable, "-c", ON_SIGTERM, str(marks), name, str(linger_s)],
                           stdout=subprocess.PIPE, **kw)

    for child in (start("redis", 0.0, stops_last=True), start("worker", 0.5), start("api", 0.2)):
        _ready(child)  # its SIGTERM handler is in place
    group.stop(timeout=10)
    lines = [line.split() for line in marks.read_text().splitlines()]
    got = {name: (float(told), float(exited)) for name, told, exited in lines}
    assert set(got) == {"redis", "worker", "api"}
    # The worker and the API were told at once; Redis only once both had exited.
    assert abs(got["worker"][0] - got["api"][0]) < 0.3
    assert got["redis"][0] >= max(got["worker"][1], got["api"][1])
    assert all(c.proc.poll() == 0 for c in group.children)


def test_a_stuck_child_does_not_keep_the_services_up_past_the_deadline(tmp_path):
    group = ProcessGroup()
    stuck = group.start("stuck", [sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    service = group.start("redis", SLEEP, stops_last=True)
    _ready(stuck)
    t = time.monotonic()
    group.stop(timeout=1.0)
    assert time.monotonic() - t < 8
    assert stuck.proc.poll() == -signal.SIGKILL
    assert service.proc.poll() == -signal.SIGTERM  # still told first, with its own grace


def test_the_state_dir_lock_is_held_by_one_process_and_dropped_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import time; from pathlib import Path; from azu.cli.up import lock_state_dir;"
                               f" assert lock_state_dir(Path({str(tmp_path)!r})) is not None;"
                               " print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        assert lock_state_dir(tmp_path) is None
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fd = lock_state_dir(tmp_path)  # a SIGKILLed holder leaves no lock behind
    assert fd is not None
    os.close(fd)


def _state_dir(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_running_network(root: Path) -> None:
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "api.log").write_text("the first network's log\n")
    (root / "redis").mkdir()
    (root / "redis" / "redis.conf").write_text("port 1\n")
    (root / "chain.json").write_text("{}")
    (root / "local.json").write_text(json.dumps({"pid": 1, "base_url": "http://127.0.0.1:1"}))


def _azu_up(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "azu.cli", "up", "--state-dir", str(tmp_path / ".azu"),
                           *args], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)


def test_a_second_azu_up_on_a_taken_port_touches_nothing(tmp_path):
    root = tmp_path / ".azu"
    _fake_running_network(root)
    before = _state_dir(root)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _azu_up(tmp_path, "--port", str(port))
    assert done.returncode == 2 and f"port {port} is already in use" in done.stderr
    assert _state_dir(root) == before


def test_a_second_azu_up_on_a_state_dir_in_use_touches_nothing(tmp_path):
    root = tmp_path / ".azu"
    _fake_running_network(root)
    before = _state_dir(root)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import time; from pathlib import Path; from azu.cli.up import lock_state_dir;"
                               f" assert lock_state_dir(Path({str(root)!r})) is not None;"
                               " print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        before = _state_dir(root)  # up.lock included
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = _azu_up(tmp_path, "--port", str(port))
        assert done.returncode == 2 and "another azu up" in done.stderr
        assert _state_dir(root) == before
    finally:
        holder.kill()
        holder.wait()


def test_copies_need_two_workers_each(tmp_path):
    done = _azu_up(tmp_path, "--workers", "3", "--copies", "2")
    assert done.returncode == 2 and "--copies 2 needs --workers 4" in done.stderr
    assert not (tmp_path / ".azu").exists()  # refused before anything was made


def test_stale_pgserver_handles_are_dropped(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen(SLEEP)
    try:
        (tmp_path / ".handle_pids.json").write_text(json.dumps([gone.pid, live.pid]))
        assert prune_pg_handles(tmp_path) == [gone.pid]
        assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [live.pid]
        assert prune_pg_handles(tmp_path) == []  # nothing more to drop
        assert prune_pg_handles(tmp_path / "missing") == []
    finally:
        live.kill()
        live.wait()
