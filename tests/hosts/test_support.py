"""The host-test machinery itself: namespaces are removed after a crash, and the relay delays in order."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from tests.support import REPO, wait_for
from tests.support.hosts import DelayRelay, Hosts, ip, namespaces_of, require_hosts


def test_a_crashed_runs_leftovers_are_removed_by_the_next(tmp_path):
    require_hosts()
    # A run that builds its hosts, starts a process in one, then dies without cleaning anything up.
    code = ("import os, subprocess, sys; from tests.support.hosts import Hosts, netns_argv\n"
            "h = Hosts(1).__enter__()\n"
            "subprocess.Popen(netns_argv(h.workers[0], ['sleep', '600']), start_new_session=True,\n"
            "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(h.n, flush=True)\n"
            "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    n = int(out.stdout.split()[0])
    assert namespaces_of(n)  # left behind
    pids = [int(p) for ns in namespaces_of(n) for p in ip("netns", "pids", ns).stdout.split()]
    assert pids  # and the process inside it

    with Hosts(1) as h:
        assert h.n == n  # its index is free again
        assert sorted(namespaces_of(n)) == sorted([h.core, *h.workers])  # only the new run's namespaces
        assert not ip("netns", "pids", h.workers[0]).stdout.split()  # a fresh one, nothing running in it
    assert not namespaces_of(n)
    assert f"azub{n}" not in ip("-o", "link", "show").stdout

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"  # killed, only waiting for its reaper
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(p) for p in pids), timeout=10, what="the crashed run's process to be killed")


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    import threading

    threading.Thread(target=serve, daemon=True).start()
    return srv, port


def test_relay_delays_each_way_and_keeps_order():
    srv, port = _echo_server()
    with srv, DelayRelay(listen_host="127.0.0.1", upstream=("127.0.0.1", port), delay_s=0.1) as relay, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
        payload = b"".join(i.to_bytes(4, "big") for i in range(50_000))
        start = time.monotonic()
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += c.recv(65536)
        elapsed = time.monotonic() - start
    assert got == payload  # every byte, in order
    assert 0.2 <= elapsed < 2.0  # 0.1 s there and 0.1 s back, pipelined (not per chunk)
    assert relay.connections == 1
    # Every chunk went out no earlier than due; how much later is recorded (the bound's correction).
    assert relay.sent_chunks >= 2 and 0.0 <= relay.late_s / relay.sent_chunks < 0.1


def test_relay_drop_breaks_open_connections_and_refuses_new_ones():
    srv, port = _echo_server()
    with srv, DelayRelay(listen_host="127.0.0.1", upstream=("127.0.0.1", port), delay_s=0.0) as relay:
        c = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        relay.drop()
        assert c.recv(4) == b""  # the link is gone: end of stream (or a reset)
        c.close()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as d:
            assert d.recv(4) == b""
