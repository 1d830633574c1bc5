"""The processes of an azu network and their console scripts (setup.cfg ``console_scripts``).

==============  =========================================================================================
azu-api         gunicorn serving ``web:create_app()`` (gthread workers: SSE streams hold a thread each)
azu-scheduler   ``celery -A workers worker -Q core`` and ``celery -A workers beat`` (its own process, so it
                never outlives the scheduler's worker as an orphan; in-memory schedule: no pickle file on
                disk, which beat's default shelve store would write), supervised together
azu-registry    ``celery -A workers worker -Q registry`` + the registry routes (gunicorn, REGISTRY_URL's port)
collector       ``python -m azu.cli.processes collector``: pops the workers' signed reports
                (``azu.network.collector.run``) and writes the facts they prove (events, directory, loads)
azu-core        API + scheduler + beat + registry + collector, supervised together: a child that exits is
                started again with backoff (``RESTART_POLICY``); SIGINT, SIGTERM or SIGHUP stops them all
azu-worker      a GPU/CPU worker node (``azu.cli.worker``: enrolls with the core, then runs Celery with its
                own broker login; its runtime is ``azu.network.node``)
==============  =========================================================================================

Core processes are configured by the environment: REDIS_URL (the core's Redis login, which may run
ACL SETUSER), REGISTRY_URL, AUTH_SECRET_KEY (the core's signing key), HF_TOKEN, DATABASE_URL; children inherit
it. A worker node gets none of these: azu-worker hands its Celery only what enrollment gave it. azu/ must
not import Flask or Celery, so each server runs through its own command line (``python -m gunicorn`` /
``python -m celery``), which is also exactly what an operator would type.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from azu.cli import env_help, parser_for

log = logging.getLogger(__name__)

DEFAULT_API_PORT = 8000
DEFAULT_REGISTRY_PORT = 8002


# --- command lines ------------------------------------------------------------------------------------------
# Threads of an API process. Every answer in flight holds one (a streamed answer for as long as it streams, a
# plain one until its job ends: both wait on the job's events), so this is how many answers one process serves
# at once; the next requests wait in the socket's queue, their time to first token growing by whole answers.
# At 16 (before the fortieth session), 64 streams at once through `azu up` got their first tokens after a
# median 6.0-6.5 s, 2.2-2.6 s at 128 (bench/api_streams.py). A waiting thread costs its stack and a Redis
# connection (web.REDIS_CONNECTIONS).
API_THREADS = 128


def gunicorn_argv(app_spec: str, *, host: str, port: int, workers: int = 2, threads: int = API_THREADS,
                  loglevel: str = "INFO") -> list[str]:
    # web.server.JsonErrorsWorker is gthread whose own 400/414/431 answers are JSON in the API's error shape.
    return [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}", "--worker-class",
            "web.server.JsonErrorsWorker",
            "--workers", str(workers), "--threads", str(threads),
            # A streamed answer can last minutes; gthread workers heartbeat from their main thread, so the
            # worker timeout only catches a stuck process, not a long request.
            "--timeout", "120", "--graceful-timeout", "10", "--access-logfile", "-",
            "--log-level", loglevel.lower(), app_spec]


def celery_argv(queues: str, *, name: str, pool: str = "prefork", concurrency: int | None = None,
                beat: bool = False, loglevel: str = "INFO", events: bool = False) -> list[str]:
    """``celery -A workers worker`` on ``queues`` (the one Celery command line: services and worker nodes).

    ``events``: send task events (``-E``, for Flower)."""
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", queues, "-n", f"{name}@%h",
            "--pool", pool, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if beat:  # an embedded beat: a child of the worker, orphaned if the worker is SIGKILLed (use beat_argv)
        argv += ["--beat", "--scheduler", "celery.beat:Scheduler"]
    if events:
        argv.append("-E")
    return argv


def beat_argv(*, loglevel: str = "INFO") -> list[str]:
    """``celery -A workers beat``: the periodic ticks (payouts, watchdog, reconcile) as a process of its own.

    Supervised next to the scheduler rather than embedded in it (``worker --beat`` forks it as the
    worker's child, which a SIGKILL of the worker orphans: two beats, every tick twice). The in-memory
    ``celery.beat:Scheduler`` (celeryconfig ``beat_scheduler``) writes no schedule file."""
    return [sys.executable, "-m", "celery", "-A", "workers", "beat", "--scheduler", "celery.beat:Scheduler",
            "--loglevel", loglevel]


def registry_port() -> int:
    url = os.environ.get("REGISTRY_URL") or ""
    port = urlparse(url).port if url else None
    return env_int("AZU_REGISTRY_PORT", port or DEFAULT_REGISTRY_PORT)


# --- a small supervisor -------------------------------------------------------------------------------------
# The restart policy of every supervised child (azu up, azu-core, azu-registry, azu-scheduler):
RESTART_FIRST_S = 0.5     # a crashed child is started again after 0.5 s, then 1, 2, 4 ... up to 30 s
RESTART_MAX_S = 30.0
STABLE_S = 60.0           # a child that stayed up this long before crashing starts again from 0.5 s
GIVE_UP_CRASHES = 5       # the 5th crash within GIVE_UP_WINDOW_S: given up on
GIVE_UP_WINDOW_S = 120.0
RESTART_POLICY = (f"a child that exits is started again after {RESTART_FIRST_S:g} s, doubling up to "
                  f"{RESTART_MAX_S:g} s (back to {RESTART_FIRST_S:g} s once it stayed up {STABLE_S:g} s); "
                  f"one that crashes {GIVE_UP_CRASHES} times within {GIVE_UP_WINDOW_S:g} s is given up on: "
                  "a worker is left down (the others keep serving), any other process stops everything")
LAST_STOP_GRACE_S = 2.0   # what the services stopped last (Redis) get at least to exit on their own
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, the terminal closed


@dataclass
class Child:
    """One supervised process: how to start it again, and its crash history."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    env: dict[str, str] | None = None
    cwd: str | None = None
    log: Path | None = None  # stdout and stderr appended here, reopened at every start
    essential: bool = True   # given up on: stop everything (False: leave it down, the rest serves)
    # A service the others talk to (Redis, the dev chain): stopped once they have exited, so a worker
    # finishing its session or a task being acknowledged still finds it (no "connection lost" at Ctrl-C).
    stops_last: bool = False
    started_at: float = field(default_factory=time.monotonic)
    crashes: list[float] = field(default_factory=list)
    delay: float = RESTART_FIRST_S
    restart_at: float | None = None  # when it crashed: the time it is started again
    restarts: int = 0
    given_up: bool = False


@dataclass
class ProcessGroup:
    """Children started in their own sessions, supervised, stopped together (their own children included).

    Each child leads its own process group, so stopping it reaches what it spawned (gunicorn's and
    Celery's pool processes) without touching anything this process did not start. ``run_until_signal``
    restarts a child that exits (``RESTART_POLICY``) until SIGINT, SIGTERM or SIGHUP.
    """

    children: list[Child] = field(default_factory=list)
    _hurry: bool = False
    # While a child is being started and recorded: a stop signal's handler (azu up's) must not unwind here,
    # or a started child would be known to nobody. It sets ``deferred`` and ``start`` raises it afterwards.
    spawning: bool = False
    deferred: BaseException | None = None

    def interrupt(self, exc: BaseException) -> None:
        """Raise ``exc`` now, or, while a child is being started, once it is recorded (signal handlers)."""
        if self.spawning:
            self.deferred = exc
            return
        raise exc

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdout=None, stderr=None, cwd: str | None = None, log: Path | None = None,
              essential: bool = True, stops_last: bool = False) -> Child:
        """Start ``argv``; with ``log``, its stdout and stderr go to that file (appended); ``stops_last``:
        a service the others use, stopped after them."""
        self.spawning = True
        try:
            child = Child(name, list(argv), self._spawn(list(argv), env, cwd, log, stdout, stderr), env=env,
                          cwd=cwd, log=log, essential=essential, stops_last=stops_last)
            self.children.append(child)
        finally:
            self.spawning = False
        if self.deferred is not None:
            exc, self.deferred = self.deferred, None
            raise exc
        return child

    @staticmethod
    def _spawn(argv: list[str], env: dict[str, str] | None, cwd: str | None, log: Path | None,
               stdout=None, stderr=None) -> subprocess.Popen[bytes]:
        if log is None:
            return subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, cwd=cwd,
                                    start_new_session=True)
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                    start_new_session=True)

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None and not c.given_up), None)

    def supervise(self, now: float | None = None) -> Child | None:
        """One pass: note the children that exited, start again those whose delay has passed.

        Returns an essential child given up on in this pass (the caller stops everything), else None."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.given_up:
                continue
            if child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                _signal_group(child.proc, signal.SIGKILL)  # what it left behind (pool processes) goes too
                if now - child.started_at >= STABLE_S:
                    child.delay = RESTART_FIRST_S
                child.crashes = [t for t in child.crashes if now - t < GIVE_UP_WINDOW_S] + [now]
                if len(child.crashes) >= GIVE_UP_CRASHES:
                    child.given_up = True
                    what = "stopping everything" if child.essential else "leaving it down"
                    log.error("%s exited with code %s, its %d. exit within %.0f s: giving up on it, %s%s",
                              child.name, code, len(child.crashes), GIVE_UP_WINDOW_S, what,
                              f" (see {child.log})" if child.log else "")
                    if child.essential:
                        return child
                    continue
                child.restart_at = now + child.delay
                log.warning("%s exited with code %s; starting it again in %.1f s%s", child.name, code,
                            child.delay, f" (see {child.log})" if child.log else "")
                child.delay = min(child.delay * 2, RESTART_MAX_S)
            elif now >= child.restart_at:
                child.proc = self._spawn(child.argv, child.env, child.cwd, child.log)
                child.started_at, child.restart_at = now, None
                child.restarts += 1
                log.warning("%s started again (pid %d, restart %d)", child.name, child.proc.pid,
                            child.restarts)
        return None

    def stop(self, *, timeout: float = 15.0) -> None:
        """SIGTERM every child's group (newest first; the ``stops_last`` ones once the others have exited),
        wait up to ``timeout`` in all, then SIGKILL what is left.

        A second SIGINT/SIGTERM/SIGHUP meanwhile cuts the wait short (straight to SIGKILL); none of them
        interrupts the stopping itself, so nothing is left running."""
        self._hurry = False

        def _on_signal(_signum, _frame):
            self._hurry = True

        old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
        try:
            deadline = time.monotonic() + timeout
            self._terminate([c for c in self.children if not c.stops_last], deadline)
            # The services get their own short grace even after a stuck child used up the deadline.
            self._terminate([c for c in self.children if c.stops_last],
                            max(deadline, time.monotonic() + LAST_STOP_GRACE_S))
            for child in self.children:
                if child.proc.poll() is None:
                    log.warning("%s did not stop in time; killing it", child.name)
                # Also kill the group of a child that exited but left grandchildren behind.
                _signal_group(child.proc, signal.SIGKILL)
            for child in self.children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=5)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _terminate(self, children: list[Child], deadline: float) -> None:
        """SIGTERM ``children``' groups (newest first) and wait until they have exited, the ``deadline``
        passes or a second stop signal hurries the stop."""
        for child in reversed(children):
            _signal_group(child.proc, signal.SIGTERM)
        while not self._hurry and time.monotonic() < deadline:
            if all(c.proc.poll() is not None for c in children):
                break
            time.sleep(0.05)  # polling the children's exit against the deadline

    def run_until_signal(self, *, on_tick: Callable[[], object] | None = None, tick_s: float = 5.0) -> int:
        """Supervise until SIGINT/SIGTERM/SIGHUP (0) or until an essential child is given up on (1); then
        stop all.

        ``on_tick`` runs every ``tick_s`` seconds meanwhile (``azu up`` caps its log files there)."""
        stop: dict[str, int | None] = {"signal": None}
        next_tick = time.monotonic() + tick_s

        def _on_signal(signum, _frame):
            stop["signal"] = signum

        old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
        try:
            while stop["signal"] is None:
                if self.supervise() is not None:
                    return 1
                if on_tick is not None and time.monotonic() >= next_tick:
                    try:
                        on_tick()
                    except OSError as exc:  # a full disk or a vanished file must not stop the network
                        log.warning("periodic task failed: %s", exc)
                    next_tick = time.monotonic() + tick_s
                time.sleep(0.2)  # a supervisor's poll: notice a dead child (signals end the wait early)
            return 0
        finally:
            self.stop()
            for s, handler in old.items():
                signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the child's own group (start_new_session): pid == pgid


def _exec(argv: list[str]) -> int:
    """Replace this process with ``argv``: signals reach the server directly, no supervisor in between."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


# --- entry points -------------------------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    """An integer default from the environment; a malformed value stops the command with its name."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def _logging(level: str, name: str) -> None:
    """The supervisor's own lines (a child restarted, given up on) on stderr."""
    logging.basicConfig(level=level.upper(), format=f"[%(asctime)s: %(levelname)s/{name}] %(message)s")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = parser_for(prog, description)
    p.add_argument("--loglevel", default=os.environ.get("AZU_LOGLEVEL", "INFO"),
                   help=env_help("log level of the servers it runs (DEBUG, INFO, WARNING, ERROR)",
                                 "AZU_LOGLEVEL"))
    return p


def _api_args(p: argparse.ArgumentParser) -> None:
    # A server: all interfaces by default.
    p.add_argument("--host", default=os.environ.get("AZU_API_HOST", "0.0.0.0"),
                   help=env_help("interface the API listens on", "AZU_API_HOST"))
    p.add_argument("--port", type=int, default=env_int("AZU_API_PORT", DEFAULT_API_PORT),
                   help=env_help("port the API listens on", "AZU_API_PORT"))
    p.add_argument("--web-workers", type=int, default=env_int("AZU_WEB_WORKERS", 2),
                   help=env_help("gunicorn worker processes of the API", "AZU_WEB_WORKERS"))
    p.add_argument("--threads", type=int, default=env_int("AZU_WEB_THREADS", API_THREADS),
                   help=env_help("threads per API process: each answer in flight holds one, so this is how "
                                 "many it serves at once", "AZU_WEB_THREADS"))


def _check_api_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Stop (exit 2, with the reason) on API sizes gunicorn would fail to boot with."""
    if a.web_workers < 1 or a.threads < 1:
        p.error("--web-workers and --threads must be at least 1 (each answer in flight holds a thread)")


def metrics_dir(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The environment of a gunicorn service whose processes count Prometheus metrics into ``folder``.

    prometheus_client's multiprocess mode sums the files every process writes there; files left by an earlier
    run would be counted again, so the folder is emptied first. One folder per service, never shared."""
    path = Path(folder)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return {"PROMETHEUS_MULTIPROC_DIR": str(path)}


def _service_metrics(name: str) -> dict[str, str] | None:
    """With ``PROMETHEUS_MULTIPROC_DIR`` set, the environment giving service ``name`` its own subfolder."""
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return {**os.environ, **metrics_dir(Path(base) / name)} if base else None


def api_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("azu-api", "the HTTP API (REST + OpenAI-compatible)")
    _api_args(p)
    a = p.parse_args(argv)
    _check_api_args(p, a)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ.update(_service_metrics("api") or {})
    return _exec(gunicorn_argv("web:create_app()", host=a.host, port=a.port, workers=a.web_workers,
                               threads=a.threads, loglevel=a.loglevel))


def _scheduler_children(group: ProcessGroup, a: argparse.Namespace) -> None:
    group.start("scheduler", celery_argv("core", name="scheduler", pool=a.pool, concurrency=a.concurrency,
                                         loglevel=a.loglevel))
    group.start("beat", beat_argv(loglevel=a.loglevel))


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default=os.environ.get("AZU_CORE_POOL", "prefork"),
                   help=env_help("Celery pool of the core queue (prefork, solo, threads)", "AZU_CORE_POOL"))
    p.add_argument("--concurrency", type=int, default=env_int("AZU_CORE_CONCURRENCY", 2),
                   help=env_help("Celery processes of the core queue", "AZU_CORE_CONCURRENCY"))


def scheduler_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("azu-scheduler", "the scheduler: Celery queue 'core' and its beat, two supervised processes; "
                + RESTART_POLICY)
    _scheduler_args(p)
    a = p.parse_args(argv)
    _logging(a.loglevel, "azu-scheduler")
    group = ProcessGroup()
    _scheduler_children(group, a)
    return group.run_until_signal()


def _registry_children(group: ProcessGroup, a: argparse.Namespace) -> None:
    # Sharding is disk- and memory-heavy: one at a time per registry process.
    group.start("registry-tasks", celery_argv("registry", name="registry", pool="solo", loglevel=a.loglevel))
    group.start("registry-http", gunicorn_argv("web:create_app({'AZU_ROLE': 'registry'})",
                                               host=a.registry_host, port=a.registry_port, workers=1,
                                               threads=16, loglevel=a.loglevel),
                env=_service_metrics("registry"))


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry-host", default=os.environ.get("AZU_REGISTRY_HOST", "0.0.0.0"),
                   help=env_help("interface the registry's HTTP routes listen on", "AZU_REGISTRY_HOST"))
    p.add_argument("--registry-port", type=int, default=registry_port(),
                   help="port of the registry's HTTP routes; env AZU_REGISTRY_PORT, else REGISTRY_URL's port")


def registry_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("azu-registry", "the registry: Celery queue 'registry' + the shard/status/file routes, "
                "supervised; " + RESTART_POLICY)
    _registry_args(p)
    a = p.parse_args(argv)
    _logging(a.loglevel, "azu-registry")
    group = ProcessGroup()
    _registry_children(group, a)
    return group.run_until_signal()


def collector_argv(*, loglevel: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "azu.cli.processes", "collector"]
    return [*argv, "--loglevel", loglevel] if loglevel else argv


def collector_main(argv: Sequence[str] | None = None) -> int:
    """The collector: reads the workers' report lists until SIGTERM/SIGINT (a core process: core login)."""
    a = _parser("python -m azu.cli.processes collector",
                "the collector: checks the workers' signed reports (azu:reports:from:<id>) and writes "
                "what they prove; a core process (REDIS_URL: the core's login)").parse_args(argv)
    logging.basicConfig(level=a.loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/collector] %(message)s")
    from azu.network import collector

    collector.run()
    return 0


def verifier_argv(*, loglevel: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "azu.cli.processes", "verifier"]
    return [*argv, "--loglevel", loglevel] if loglevel else argv


def verifier_main(argv: Sequence[str] | None = None) -> int:
    """The verifier: re-computes the jobs picked for a check (``azu:verify:queue``) until SIGTERM/SIGINT."""
    a = _parser("python -m azu.cli.processes verifier",
                "the verifier: re-computes finished jobs picked for a check and acts on the verdict "
                "(withhold, ban); a core process (REDIS_URL: the core's login; DATABASE_URL: the ledger; "
                "the registry's shard files). Its own process: a check must not slow the collector down"
                ).parse_args(argv)
    logging.basicConfig(level=a.loglevel.upper(),
                        format="[%(asctime)s: %(levelname)s/verifier] %(message)s")
    import signal
    import threading

    from azu.verification import verifier

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    verifier.run(stop_event=stop)
    return 0


def core_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("azu-core", "API + scheduler + beat + registry + collector + verifier in one supervised "
                "group; " + RESTART_POLICY)
    _api_args(p)
    _scheduler_args(p)
    _registry_args(p)
    a = p.parse_args(argv)
    _check_api_args(p, a)
    _logging(a.loglevel, "azu-core")
    group = ProcessGroup()
    _scheduler_children(group, a)
    group.start("collector", collector_argv(loglevel=a.loglevel))
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        group.start("verifier", verifier_argv(loglevel=a.loglevel))
    else:  # the core image has no torch: the verifier runs from the worker image (docker/compose.yaml)
        logging.getLogger("azu-core").warning(
            "no torch here: the verifier is not started; run `python -m azu.cli.processes verifier` on a "
            "machine with torch and the core's REDIS_URL, DATABASE_URL, AUTH_SECRET_KEY and registry files")
    _registry_children(group, a)
    group.start("api", gunicorn_argv("web:create_app()", host=a.host, port=a.port, workers=a.web_workers,
                                     threads=a.threads, loglevel=a.loglevel), env=_service_metrics("api"))
    return group.run_until_signal()


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A worker node: registers, heartbeats, loads layers on order, runs its queue ``gpu.<worker_id>``."""
    from azu.cli.worker import main

    return main(argv)


_MAINS = {"api": api_main, "scheduler": scheduler_main, "registry": registry_main, "core": core_main,
          "collector": collector_main, "verifier": verifier_main, "worker": worker_main}

if __name__ == "__main__":
    # ``python -m azu.cli.processes worker`` works without the console scripts installed (azu up uses it).
    if len(sys.argv) < 2 or sys.argv[1] not in _MAINS:
        sys.exit(f"usage: python -m azu.cli.processes {{{','.join(_MAINS)}}} [options]")
    sys.exit(_MAINS[sys.argv[1]](sys.argv[2:]))
