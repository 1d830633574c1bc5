"""The pipeline tests' world (tests/network): their own Redis database, a static-file registry over HTTP,
real Celery worker processes (``Cluster``), and in-process stand-ins for the dispatcher."""

from __future__ import annotations

import collections
import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import redis

from tests.support import REPO, wait_for

# One Redis database for this folder (not db 0, which a developer's local network may use).
DB = int(os.environ.get("AZU_TEST_NETWORK_DB") or 9)
# A script (bench/faults.py) may run the same world against a Redis of its own.
REDIS_URL = os.environ.get("AZU_TEST_NETWORK_REDIS_URL") or f"redis://127.0.0.1:6379/{DB}"
# The core's signing key of every test network (a fixed seed: the test process and the core worker agree).
SECRET = "7e57" * 16


def heartbeat(r: redis.Redis, worker_ids: Any, now: float) -> None:
    """What each worker's next heartbeat writes, dated ``now`` (later: it looks alive then; earlier: it went
    quiet back then): its record again, the directory's time and the index of each model it holds."""
    from azu.network import directory

    for worker_id in worker_ids:
        info = directory.get_worker(r, worker_id)
        assert info is not None, f"{worker_id} has no directory record"
        directory.register(r, info, now=now)


class RegistryHandler(http.server.BaseHTTPRequestHandler):
    """GET /models/files/<name>?model_id=<id>: the file from the shard folder (as web/registry.py serves)."""

    def do_GET(self) -> None:
        from azu.registry import status as models

        url = urlparse(self.path)
        name = url.path.rsplit("/", 1)[-1]
        model_id = parse_qs(url.query).get("model_id", [""])[0]
        if not url.path.startswith("/models/files/") or "/" in name or name.startswith("."):
            self.send_error(404)
            return
        path = models.shard_dir(model_id) / name
        tamper = self.server.tamper.get((model_id, name))  # type: ignore[attr-defined]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes() if tamper is None else tamper(path.read_bytes())
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        return


def serve_registry() -> Any:
    """A static-file registry (``RegistryHandler``) over real HTTP on a free loopback port, served from a
    daemon thread: ``.url`` is its address, ``.tamper[(model, file)]`` can corrupt what it serves; stop it
    with ``shutdown()``. The tests' registry fixture and the benches start theirs here."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RegistryHandler)
    server.tamper = {}  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Cluster:
    """Celery worker processes of one test session."""

    def __init__(self, r: redis.Redis, base: Path, registry_url: str) -> None:
        self.r = r
        self.base = base
        self.registry_url = registry_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def env(self, **extra: str) -> dict[str, str]:
        """A GPU worker's environment: the core's public key, never its secret."""
        from nacl.signing import SigningKey

        from azu.network import auth

        env = dict(os.environ, REDIS_URL=REDIS_URL, OMP_NUM_THREADS="1",
                   AZU_CORE_PUBLIC_KEY=auth.public_hex(SigningKey(bytes.fromhex(SECRET))),
                   REGISTRY_URL=self.registry_url, AZU_HEARTBEAT_S="0.5", PYTHONPATH=str(REPO),
                   AZU_REGISTRY_DIR=os.environ["AZU_REGISTRY_DIR"], AZU_DEVICE="cpu", AZU_DTYPE="float32")
        env.pop("DATABASE_URL", None)  # FreeBilling: the ledger has its own tests
        env.pop("AUTH_SECRET_KEY", None)
        env.update(extra)
        return env

    def enroll(self, worker_id: str) -> Path:
        """What enrollment does for a worker: its key file, and its public key as its identity."""
        from azu.network import auth, identity

        path = self.base / "keys" / f"{worker_id}.key"
        identity.publish(self.r, worker_id, auth.public_hex(auth.load_worker_key(path)))
        return path

    def start_gpu(self, worker_id: str, *, via_cli: bool = False, heartbeat: bool = False,
                  **extra: str) -> None:
        """``via_cli``: through ``azu-worker`` (azu.cli.worker.main), which execs the same Celery worker;
        ``heartbeat``: with Celery's worker heartbeat (what Flower shows), as ``celery worker`` has it."""
        if via_cli:
            argv = [sys.executable, "-c", "import sys; from azu.cli.worker import main; sys.exit(main())",
                    "--worker-id", worker_id, "--device", "cpu", "--loglevel", "INFO"]
        else:
            argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
                    f"gpu.{worker_id},ctl.{worker_id}", "--pool", "solo", "-n", f"{worker_id}@test",
                    "--loglevel", "INFO", "--without-gossip", "--without-mingle",
                    *([] if heartbeat else ["--without-heartbeat"])]
        key_file = self.enroll(worker_id)
        self._spawn(worker_id, argv, self.env(AZU_WORKER_ID=worker_id, AZU_WORKER_KEY_FILE=str(key_file),
                                              AZU_CACHE_DIR=str(self.base / f"cache-{worker_id}"), **extra))

    def start_core(self, name: str = "core") -> None:
        argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "core,registry",
                "--pool", "solo", "-n", f"{name}@test", "--loglevel", "INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        # The registry shards local folders under base; the core signs (and runs the report collector).
        env = self.env(AZU_ALLOWED_MODEL_DIRS=str(self.base), AUTH_SECRET_KEY=SECRET)
        env.pop("AZU_WORKER_ID", None)
        env.pop("AZU_CORE_PUBLIC_KEY", None)
        self._spawn(name, argv, env)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.base / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def wait_live(self, *worker_ids: str, timeout: float = 90.0) -> None:
        from azu.network import directory

        def ready() -> bool:
            for wid in worker_ids:
                proc = self.procs[wid]
                if proc.poll() is not None:
                    raise AssertionError(f"worker {wid} exited ({proc.returncode}):\n{self.log(wid)[-3000:]}")
            live = {w.worker_id for w in directory.live_workers(self.r)}
            return set(worker_ids) <= live

        wait_for(ready, timeout=timeout, what=f"workers {worker_ids} to register")

    def wait_core(self, name: str = "core", timeout: float = 60.0) -> None:
        wait_for(lambda: "ready." in self.log(name), timeout=timeout, what=f"{name} worker to be ready")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self, name: str) -> None:
        """SIGKILL: the worker dies without saying goodbye (its heartbeat just stops)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():  # all at once: each warm shutdown takes a moment
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            self.stop(name)


def noted_reads(monkeypatch: Any) -> list[tuple[str | None, int | str, bool]]:
    """Each directory read (``directory.snapshot``) from now on: (the model whose holders it read, or None:
    every worker; its ``per_span``, or "roomiest" for placement's read; whether it left workers out)."""
    from azu.network import directory

    reads: list[tuple[str | None, int | str, bool]] = []
    real = directory.snapshot

    def noted(*args: Any, **kwargs: Any) -> directory.Snapshot:
        got = real(*args, **kwargs)
        how = "roomiest" if kwargs.get("roomiest") else kwargs.get("per_span", 0)
        reads.append((kwargs.get("model_id"), how, got.sampled))
        return got

    monkeypatch.setattr(directory, "snapshot", noted)
    return reads


def noted_places(monkeypatch: Any) -> list[str]:
    """The model of each ``jobs.place`` call from now on."""
    from azu.network import jobs

    placed: list[str] = []
    real = jobs.place

    def place(r: redis.Redis, model_id: str, **kwargs: Any) -> Any:
        placed.append(model_id)
        return real(r, model_id, **kwargs)

    monkeypatch.setattr(jobs, "place", place)
    return placed


class Recording:
    """Wraps a dispatcher and remembers what was sent (to count, e.g., shard tasks)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send_task(self, name: str, *, queue: str, args: Any = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        self.sent.append((name, queue, dict(kwargs or {})))
        if self.inner is not None:
            self.inner.send_task(name, queue=queue, args=args, kwargs=kwargs)

    def count(self, name: str) -> int:
        return sum(1 for n, _, _ in self.sent if n == name)


class InlineNetwork:
    """In-process WorkerNodes driven by a queue instead of Celery, with the collector run in between: for
    the fine-grained tests of the node's logic (replays, cancellation, stop strings) where a real process
    would hide the timing. The pipeline tests proper use real worker processes.

    The test plays the core: it enrolls each node (its identity) and orders its span (``assigned``). The
    nodes report on a list of their own, so a cluster's collector running meanwhile never sees them."""

    REPORTS = "azu:reports:inline"
    VERIFY_QUEUE = "azu:verify:queue:inline"  # a cluster's verifier must not take these jobs
    # A cluster's core may run meanwhile (same Redis): its collector re-routes running jobs whose workers
    # stopped heartbeating, so these nodes heartbeat (every BEAT_S while stepping) like real workers.
    BEAT_S = 0.5

    def __init__(self, r: redis.Redis) -> None:
        from azu.network.collector import Collector
        from azu.network.reports import ReportLists

        self.r = r
        self.lists = ReportLists(r, self.REPORTS)
        self.queue: collections.deque[tuple[str, str, list[Any], dict[str, Any]]] = collections.deque()
        self.nodes: dict[str, Any] = {}
        self.sent: list[str] = []
        self.collector = Collector(r, dispatch=self, verify_queue=self.VERIFY_QUEUE)
        self.beat = time.monotonic()

    def send_task(self, name: str, *, queue: str, args: Any = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        self.queue.append((name, queue, list(args), dict(kwargs or {})))
        self.sent.append(name)

    def add(self, worker_id: str, folder: Path, model_id: str, first: int, last: int, num_layers: int,
            **node_options: Any) -> Any:
        from azu.engine.span import Span
        from azu.network import jobs, keys
        from azu.network.node import WorkerNode

        # linger_s=0: this queue runs one message at a time in this thread; nobody else could fill the list.
        node = self.nodes.get(worker_id) or WorkerNode(self.r, worker_id=worker_id, dispatch=self, linger_s=0,
                                                       reports_base=self.REPORTS, **node_options)
        span = Span(first, last, first == 0, last == num_layers)
        self.r.set(keys.identity(worker_id), node.public_key)
        self.r.sadd(keys.assigned(worker_id), jobs.span_key(model_id, span))
        node.load_local(folder, model_id=model_id, span=span)
        self.nodes[worker_id] = node
        self.collect()
        return node

    def collect(self) -> int:
        """Run the collector over what the nodes reported; returns how many reports there were."""
        count = 0
        while True:
            got, senders = self.lists.take(None)  # rounds, as the collector's loop takes them
            if not got:
                return count
            self.collector.process(got, senders=senders)
            count += len(got)

    def step(self) -> bool:
        """Deliver one message (then collect the reports); False when nothing is left."""
        if not self.queue:
            return self.collect() > 0
        from azu.network import dispatch
        from azu.verification.orders import EVIDENCE

        now = time.monotonic()
        if now - self.beat >= self.BEAT_S:  # the nodes heartbeat while they work, as real workers do
            self.beat = now
            for node in self.nodes.values():
                node.heartbeat()
        name, queue, _args, kwargs = self.queue.popleft()
        kind, _, worker_id = queue.partition(".")
        node = self.nodes.get(worker_id)
        if node is not None and kind == "gpu" and name == dispatch.FORWARD:
            node.process_pending(_args[0] if _args else None)
        elif node is not None and kind == "ctl" and name == EVIDENCE:
            node.send_evidence(**kwargs)
        self.collect()
        return True

    def run(self) -> None:
        while self.step():
            pass

    def submit(self, model_id: str, *, prefix: str, **kw: Any) -> str:
        """A 24-token job on a 4-token prompt, sent through this network; its id starts with ``prefix``
        (a test module's own: its fixtures find its jobs by it)."""
        from azu.network import jobs

        job_id = f"{prefix}-{time.monotonic_ns()}"
        request = {"prompt_ids": [1, 9, 8, 7], "max_tokens": 24, **kw}
        jobs.submit_job(self.r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id, **request),
                        dispatch=self)
        return job_id

    def step_until(self, job_id: str, step: int) -> None:
        """Deliver messages until the job's step counter reaches ``step`` (there must be one to deliver)."""
        from azu.network import keys

        while int(self.r.hget(keys.job(job_id), "step") or 0) < step:
            assert self.step()
