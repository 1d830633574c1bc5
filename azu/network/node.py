"""A worker node's step runtime: admit, batch, forward, send on, finish, end jobs, heartbeat.

Framework-free: ``workers/stage.py`` (Celery) calls ``WorkerNode.process_pending`` when woken, ``load`` on a
load order and ``end_job`` when a job is over; ``start_heartbeat`` runs beside them. Fetching a span's files
is azu.network.loading, the mailbox azu.network.inbox, the command line azu.cli.worker.

One wake-up takes *every* step payload waiting for this worker, so the decode steps of all jobs at the same
stage run as one ``Stage.forward_batch``. Each payload is checked before any cache is touched: it must come in
a bundle signed by a sender the job's grant allows (the core, or the hop before), the grant must be the core's
(checked once per grant), unexpired and name this worker (and its key) at the payload's hop, and its position
must be the one the stage's cache has reached. A payload already applied (a redelivery) is answered from the
stage's last output for that job instead of being run again, so a cache never advances twice.

A worker writes no facts: what the core must know (tokens, loads, failures, refusals, heartbeats) goes as
signed reports on ``azu:reports`` (azu.network.collector). The last hop hands the next step to hop 0 itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from azu import metrics
from azu.config import Settings
from azu.engine.span import Span
from azu.errors import AzuError, Forbidden, InvalidRequest
from azu.network import auth, directory, inbox, jobs, keys, loading
from azu.network.dispatch import Dispatcher, send_forward, worker_queue
from azu.network.inbox import Inbox
from azu.network.wire import (
    JobGrant,
    Report,
    StepBundle,
    StepPayload,
    end_order_part,
    pack_tensor,
    unpack_tensor,
)

if TYPE_CHECKING:
    import torch
    from nacl.signing import SigningKey

    from azu.engine.stage import Stage
    from azu.tokenization import StreamDecoder

log = logging.getLogger(__name__)

_ENDED_MEMORY = 100_000  # ended job ids remembered (a few MB at most)

StageId = tuple[str, Span]  # (model id, span): what a held stage is known by here and in the directory


@dataclass
class _JobState:
    """What this worker remembers of a job between steps (beside the stages' KV caches)."""

    touched: float = 0.0
    epoch: int = 0  # the grant epoch the job's caches here belong to (a re-route starts a new one)
    decoder: StreamDecoder | None = None  # when the job has stop strings (last stage)
    # hop -> (step, what that step produced: the next hop's payload, or the sampled token at the last hop),
    # replayed when the same step arrives again
    last_out: dict[int, tuple[int, StepPayload | int]] = field(default_factory=dict)


@dataclass
class _Ran:
    """A step run (or replayed) here: its payload, what came out, and the positions it brought."""

    step: StepPayload
    out: Any  # hidden state (fresh), or the replayed next payload / token
    replay: bool
    tokens: int = 0


class WorkerNode:
    def __init__(self, r: redis.Redis, *, worker_id: str, dispatch: Dispatcher, device: str = "cpu",
                 dtype: str | None = None, cache_dir: str | Path = ".azu/cache",
                 registry_url: str = "http://127.0.0.1:8002", p2p_url: str | None = None,
                 wallet: str | None = None, memory_limit: int | None = None,
                 max_cached_tokens: int = 32768, kv_idle_s: float = 600.0, linger_s: float = 0.05,
                 session_s: float = 2.0, heartbeat_s: float = 3.0, key: SigningKey | None = None,
                 core_public_key: str | None = None, reports_key: str = keys.REPORTS) -> None:
        from nacl.signing import SigningKey

        self.r = r
        self.key = key or SigningKey.generate()
        self.public_key = auth.public_hex(self.key)
        self.core_key = core_public_key or auth.core_public_key()
        self.reports_key = reports_key  # where reports go (tests keep in-process nodes apart)
        self.grant_cache = auth.GrantCache()
        self.grants: dict[bytes, JobGrant] = {}  # parsed grants by their bytes (bounded in _admit_bundle)
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
        self.linger_s = linger_s  # how long an idle worker waits on its inbox before it lets Celery wake it
        self.session_s = session_s  # how long one forward task may keep taking from the inbox
        self.heartbeat_s = heartbeat_s
        self.inbox = Inbox(r, worker_id)
        self.stages: dict[StageId, Stage] = {}
        self.stage_bytes: dict[StageId, int] = {}
        self.folders: dict[str, Path] = {}  # model id -> its local shard folder (tokenizer files too)
        self.jobs: dict[str, _JobState] = {}
        # Jobs that ended here lately, with the epoch they ended at: a late duplicate of one of their steps
        # must not revive a cache (a step of a later epoch, after a re-route, may).
        self.ended: OrderedDict[str, int] = OrderedDict()
        self.started_at = time.time()
        # Stage calls come from the task thread; the heartbeat thread only sweeps idle caches under it.
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics = metrics.worker_metrics()
        metrics.watch_node(self)

    @classmethod
    def from_settings(cls, settings: Settings, r: redis.Redis, dispatch: Dispatcher) -> WorkerNode:
        """The node the operator configured (``settings.worker``; azu-worker writes it from its flags)."""
        w = settings.worker
        if not w.worker_id:
            raise InvalidRequest("AZU_WORKER_ID must be set to a name without ':' or '/'")
        cache_dir = w.cache_dir or f".azu/cache/{w.worker_id}"
        key = auth.load_worker_key(w.key_file or Path(cache_dir) / "worker.key")
        return cls(r, worker_id=w.worker_id, dispatch=dispatch, device=w.device or "cpu", dtype=w.dtype,
                   cache_dir=cache_dir, registry_url=settings.registry_url,
                   p2p_url=w.p2p_url, wallet=w.wallet, memory_limit=w.memory_bytes,
                   max_cached_tokens=w.max_cached_tokens, kv_idle_s=w.kv_idle_s, linger_s=w.linger_s,
                   session_s=w.session_s, heartbeat_s=w.heartbeat_s, key=key)

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
            free_memory=free, p2p_url=self.p2p_url, wallet=self.wallet, stages=sorted(self.stages),
            cached_jobs=len(self.jobs), started_at=self.started_at)

    def heartbeat(self) -> None:
        """Tell the core what this worker holds and has free (the core writes the directory record)."""
        i = self.info()
        self.report("heartbeat", {
            "device": i.device, "total_memory": i.total_memory, "free_memory": i.free_memory,
            "stages": [[m, *span.to_list()] for m, span in i.stages], "cached_jobs": i.cached_jobs,
            "started_at": i.started_at, "p2p_url": i.p2p_url, "wallet": i.wallet,
            "public_key": self.public_key})

    # --- reports ---------------------------------------------------------------------------------
    def signed_report(self, kind: str, body: dict[str, Any]) -> bytes:
        unsigned = Report(self.worker_id, kind, body)
        sig = auth.sign(self.key, auth.REPORT, unsigned.signed_part())
        return Report(self.worker_id, kind, body, sig).pack()

    def report(self, kind: str, body: dict[str, Any], *, pipe: Any = None) -> None:
        """Send the core a signed report (in ``pipe`` if given, else now)."""
        (pipe if pipe is not None else self.r).rpush(self.reports_key, self.signed_report(kind, body))

    def start_heartbeat(self, interval: float | None = None) -> None:
        # A new process holds no caches: payloads left for an earlier one with this id are useless (their
        # jobs fail on the position check or by the watchdog), and its wake key must not stall senders.
        self.inbox.clear()
        self.heartbeat()
        every = self.heartbeat_s if interval is None else interval

        def run() -> None:
            while not self._stop.wait(every):
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

    # --- loading ---------------------------------------------------------------------------------
    def load(self, *, model_id: str, span: Span, manifest_sha256: str | None = None) -> None:
        """Pull the span's files from the registry (every SHA-256 checked), hold the layers, say so."""
        try:
            if (model_id, span) not in self.stages:
                folder = loading.fetch_span(self.registry_url, model_id, span, self.model_folder(model_id),
                                            manifest_sha256=manifest_sha256)
                self._hold(model_id, span, folder)
        except Exception as exc:
            reason = exc.message if isinstance(exc, AzuError) else f"{type(exc).__name__}: {exc}"
            log.error("worker %s could not load %s %s: %s", self.worker_id, model_id, span, reason)
            self.report("load_failed", {"model_id": model_id, "span": span.to_list(),
                                        "reason": reason[:2000]})
            return
        self.heartbeat()  # the new holding now, not at the next beat (the core starts waiting jobs on it)
        self.report("loaded", {"model_id": model_id, "span": span.to_list()})

    def load_local(self, folder: str | Path, *, model_id: str, span: Span) -> None:
        """Hold a span from a shard folder already on this machine (benchmarks, self-checks)."""
        self._hold(model_id, span, Path(folder))
        self.heartbeat()

    def _hold(self, model_id: str, span: Span, folder: Path) -> None:
        stage, size = loading.open_stage(folder, span, device=self.device, dtype=self.dtype or "float32",
                                         max_cached_tokens=self.max_cached_tokens)
        with self.lock:
            self.stages[(model_id, span)] = stage
            self.stage_bytes[(model_id, span)] = size
            self.folders[model_id] = folder

    def model_folder(self, model_id: str) -> Path:
        return loading.model_folder(self.cache_dir, model_id)

    # --- steps -----------------------------------------------------------------------------------
    def process_pending(self, blobs: list[bytes] | None = None) -> int:
        """Run the payloads a wake-up brought, then every payload left for this worker meanwhile, batch
        after batch. With nothing left it waits up to ``linger_s`` on its inbox: while a job is generating,
        its next step arrives within milliseconds, and taking it from the list costs one Redis wake-up
        instead of a Celery message each way. After ``session_s`` it hands what is pending to a new message
        on its own queue, so load orders and end_job messages queued behind get their turn.
        Returns how many steps were run or replayed."""
        done = self._process(blobs) if blobs else 0
        deadline = time.monotonic() + self.session_s
        while True:
            if self.linger_s > 0 and time.monotonic() < deadline:
                more = self.inbox.wait(self.linger_s)
            else:
                more = self.inbox.take()
            if more:
                if time.monotonic() > deadline:  # the wake key stays set: senders keep using the list
                    self.inbox.keep_awake()
                    send_forward(self.worker_id, more, dispatch=self.dispatch)
                    return done
                done += self._process(more)
                continue
            if self.inbox.release():
                return done

    def _process(self, blobs: list[bytes]) -> int:
        groups: dict[StageId, list[StepPayload]] = defaultdict(list)
        for blob in blobs:
            for step in self._admit_bundle(blob):
                groups[(step.model_id, step.here.span)].append(step)
        done = 0
        with self.lock:
            for stage_id, steps in groups.items():
                done += self._run_group(stage_id, steps)
        return done

    def _refuse(self, reason: str, job_id: str | None = None, *, why: str = "other") -> None:
        log.warning("worker %s refused a step: %s", self.worker_id, reason)
        self.metrics.refused.labels(metrics.label(why)).inc()
        self.report("refused", {"reason": reason[:500], **({"job_id": job_id} if job_id else {})})

    def _admit_bundle(self, blob: bytes) -> list[StepPayload]:
        """The payloads of a signed bundle this worker may run; every refusal reported."""
        if len(self.grants) > 4096:
            self.grants.clear()
        try:
            bundle = StepBundle.unpack(blob)
            payloads = [StepPayload.unpack(b, grants=self.grants) for b in bundle.steps]
            sender_key = self._sender_key(bundle.sender, payloads)
            auth.check(sender_key, auth.STEPS, bundle.signed_part(), bundle.sig,
                       what=f"step bundle from {bundle.sender}")
        except AzuError as exc:
            self._refuse(exc.message, why=f"bundle_{exc.code}")
            return []
        out = []
        now = time.time()
        for p in payloads:
            try:
                self.grant_cache.check(self.core_key, p.grant, p.grant_sig)  # once per grant
                self._admit(p, bundle.sender, sender_key, now)
                out.append(p)
            except AzuError as exc:
                self._refuse(exc.message, p.job_id, why=f"payload_{exc.code}")
        return out

    def _sender_key(self, sender: str, payloads: list[StepPayload]) -> str:
        """The key a bundle's sender must have signed with: the core's, or the one a core-signed grant of
        one of its payloads names for the sender."""
        if sender == auth.CORE:
            return self.core_key
        for p in payloads:
            key = p.g.key_of(sender)
            if key is None:
                continue
            try:
                self.grant_cache.check(self.core_key, p.grant, p.grant_sig)
            except AzuError:
                continue
            return key
        raise Forbidden(f"sender {sender} is not on the route of a job the core granted")

    def _admit(self, p: StepPayload, sender: str, sender_key: str, now: float) -> None:
        """Raise unless this worker may run ``p`` (its grant and the bundle's signature are checked)."""
        g = p.g
        what = f"job {p.job_id} step {p.step} hop {p.hop}"
        if g.job_id != p.job_id:
            raise Forbidden(f"{what}: the grant is for job {g.job_id}")
        if g.expires_at < now:
            raise Forbidden(f"{what}: the grant expired")
        if g.route[p.hop].worker_id != self.worker_id or g.public_keys[p.hop] != self.public_key:
            raise Forbidden(f"{what}: hop {p.hop} is not this worker's")
        if sender != auth.CORE and g.key_of(sender) != sender_key:
            raise Forbidden(f"{what}: sender {sender} is not the grant's")
        # Who may send what: the core the prompt (and replays); hop k the hop before it; the last hop the
        # sampled token back to hop 0.
        # The epoch's first step (step 0, or a re-routed job's replay at step ``g.start``) is a prefill of
        # the prompt and the ``g.start`` tokens published before, from position 0; only the core sends it.
        first = p.step == g.start
        if sender != auth.CORE:
            expected = g.route[p.hop - 1].worker_id if p.hop > 0 else g.route[-1].worker_id
            if sender != expected or (p.hop == 0 and first):
                raise Forbidden(f"{what}: {sender} may not send it")
        if p.step >= g.sampling.max_tokens or p.step < g.start:
            raise Forbidden(f"{what}: outside the grant's steps [{g.start}, {g.sampling.max_tokens})")
        expected_pos = 0 if first else g.sampling.prompt_len + p.step - 1
        if p.pos != expected_pos:
            raise Forbidden(f"{what}: position {p.pos} is not step {p.step}'s ({expected_pos})")
        if p.hop == 0 and (not isinstance(p.x, list) or (not first and len(p.x) != 1)
                           or (first and len(p.x) != g.sampling.prompt_len + g.start)):
            raise InvalidRequest(f"{what}: hop 0 takes the prompt, then one token id per step")
        if p.hop > 0 and not isinstance(p.x, bytes):
            raise InvalidRequest(f"{what}: a later hop takes a hidden state")
        if (g.model_id, p.here.span) not in self.stages:
            raise AzuError(f"worker {self.worker_id} does not hold {g.model_id} {p.here.span}")

    def _run_group(self, stage_id: StageId, steps: list[StepPayload]) -> int:
        stage = self.stages[stage_id]
        fresh: list[StepPayload] = []
        fresh_jobs: set[str] = set()
        replays: list[StepPayload] = []
        now = time.time()
        for s in steps:
            epoch = s.g.epoch
            if self.ended.get(s.job_id, -1) >= epoch:
                log.info("job %s step %s: the job has ended here; payload dropped", s.job_id, s.step)
                continue
            state = self.jobs.get(s.job_id)
            if state is not None and state.epoch != epoch:
                if epoch < state.epoch:
                    log.info("job %s step %s: epoch %d is past (now %d); payload dropped", s.job_id, s.step,
                             epoch, state.epoch)
                    continue
                # The core re-routed the job: what this worker cached for the old route is dropped, the
                # new epoch starts from its replay (position 0).
                self._drop_caches(s.job_id)
                fresh = [f for f in fresh if f.job_id != s.job_id]  # old-epoch steps earlier in this batch
                replays = [f for f in replays if f.job_id != s.job_id]
                fresh_jobs.discard(s.job_id)
                state = None
            if state is None:
                state = self.jobs[s.job_id] = _JobState(epoch=epoch)
            have = stage.job_length(s.job_id)
            state.touched = now
            if have == s.pos:
                if s.job_id in fresh_jobs:
                    # Two copies of one step in one batch (a replay crossed the original): run it once.
                    log.info("job %s step %s: duplicate payload in one batch dropped", s.job_id, s.step)
                    continue
                fresh.append(s)
                fresh_jobs.add(s.job_id)
                continue
            last = state.last_out.get(s.hop)
            if last is not None and last[0] == s.step:
                replays.append(s)  # already applied: answer again, don't run again
            elif have > s.pos:
                log.info("job %s step %s: stale payload (cache at %d, payload at %d)", s.job_id, s.step,
                         have, s.pos)
            else:
                self._job_failed(s.job_id, f"worker {self.worker_id} lost the job's cache (at {have} "
                                 f"positions, step {s.step} needs {s.pos})")
        ran = [r for r in self._forward(stage, fresh) if r is not None]
        ran += [_Ran(s, self.jobs[s.job_id].last_out[s.hop][1], replay=True) for s in replays]
        if replays:
            self.metrics.steps.labels("replay").inc(len(replays))
        if stage_id[1].head:
            self._finish_steps(ran)
        else:
            self._send_on(ran)
        return len(ran)

    def _job_failed(self, job_id: str, reason: str) -> None:
        log.warning("worker %s: job %s failed: %s", self.worker_id, job_id, reason)
        self.report("job_failed", {"job_id": job_id, "reason": reason[:2000]})

    def _forward(self, stage: Stage, steps: list[StepPayload]) -> list[_Ran | None]:
        """What each step produced, in order (None where the job failed). Decode steps run as one batch."""
        import torch

        outputs: list[_Ran | None] = [None] * len(steps)
        inputs: list[tuple[int, torch.Tensor]] = []
        for i, s in enumerate(steps):
            try:
                x = torch.tensor(s.x, dtype=torch.long) if isinstance(s.x, list) else unpack_tensor(s.x)
                inputs.append((i, x))
            except AzuError as exc:
                self._job_failed(s.job_id, exc.message)
        done: set[int] = set()
        singles = [(i, x) for i, x in inputs if x.shape[0] == 1]
        if len(singles) > 1:
            try:
                started = time.perf_counter()
                outs = stage.forward_batch([(steps[i].job_id, x) for i, x in singles])
                self._observe_forward(started, [steps[i] for i, _ in singles])
                for (i, x), o in zip(singles, outs, strict=True):
                    outputs[i] = _Ran(steps[i], o, replay=False, tokens=int(x.shape[0]))
                done = {i for i, _ in singles}
            except Exception:
                log.exception("batched forward failed; running the steps one by one")
        for i, x in inputs:
            if i in done:
                continue
            try:
                started = time.perf_counter()
                outputs[i] = _Ran(steps[i], stage.forward(steps[i].job_id, x), replay=False,
                                  tokens=int(x.shape[0]))
                self._observe_forward(started, [steps[i]])
            except Exception as exc:
                reason = exc.message if isinstance(exc, AzuError) else f"{type(exc).__name__}: {exc}"
                self._job_failed(steps[i].job_id, f"worker {self.worker_id}: {reason}")
        return outputs

    def _observe_forward(self, started: float, steps: list[StepPayload]) -> None:
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(steps))
        prefill = sum(1 for s in steps if s.step == 0)
        if prefill:
            self.metrics.steps.labels("prefill").inc(prefill)
        if len(steps) - prefill:
            self.metrics.steps.labels("decode").inc(len(steps) - prefill)

    def _hand_over(self, nexts: list[StepPayload], *, pipe: Any = None) -> None:
        """Send steps on, in one bundle per next worker signed by this worker (after ``pipe``'s writes)."""
        pipe = pipe if pipe is not None else self.r.pipeline(transaction=False)
        if not nexts:
            if len(pipe):
                pipe.execute()
            return
        inbox.deliver(pipe, jobs.bundles(nexts, sender=self.worker_id, key=self.key), dispatch=self.dispatch)

    def _send_on(self, ran: list[_Ran]) -> None:
        nexts: list[StepPayload] = []
        for r in ran:
            if r.replay:
                nxt = r.out
            else:
                nxt = replace(r.step, hop=r.step.hop + 1, x=pack_tensor(r.out))
                self.jobs[r.step.job_id].last_out[r.step.hop] = (r.step.step, nxt)
            nexts.append(nxt)
        self._hand_over(nexts)

    def _finish_steps(self, ran: list[_Ran]) -> None:
        """Last stage: sample, tell the core each token (a signed report), and send the next step to hop 0
        unless the job ended here (stop ids, stop strings, max_tokens): one Redis round trip.

        A replayed step is reported again (the core publishes each step once) but not sent on: its successor
        was sent when it first ran, and sending it again would replay the whole route."""
        from azu.engine.sampling import SamplingParams, sample

        if not ran:
            return
        pipe = self.r.pipeline(transaction=False)
        reports: list[bytes] = []
        nexts: list[StepPayload] = []
        for r in ran:
            s = r.step
            g = s.sampling
            if r.replay:
                token = int(r.out)
            else:
                params = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
                token = int(sample(r.out, params, seed=g.seed, step=s.step))
                self.jobs[s.job_id].last_out[s.hop] = (s.step, token)
            reports.append(self.signed_report("token", {"job_id": s.job_id, "epoch": s.g.epoch,
                                                        "step": s.step, "token": token}))
            if r.replay:
                continue
            ended = (token in g.stop_ids or s.step + 1 >= g.max_tokens
                     or (bool(g.stop) and self._hits_stop(s, token)))
            if ended:
                self._end_local(s.job_id, s.g.epoch)
                continue
            nexts.append(replace(s, step=s.step + 1, hop=0, pos=g.prompt_len + s.step, x=[token]))
        pipe.rpush(self.reports_key, *reports)
        self._hand_over(nexts, pipe=pipe)

    def _hits_stop(self, s: StepPayload, token: int) -> bool:
        from azu.tokenization import load_tokenizer

        state = self.jobs[s.job_id]
        if state.decoder is None:
            tok = load_tokenizer(self.folders.get(s.model_id) or self.model_folder(s.model_id))
            state.decoder = tok.stream_decoder(stop=s.sampling.stop)
        state.decoder.push(token)
        return bool(state.decoder.stopped)

    # --- ending jobs -----------------------------------------------------------------------------
    def _drop_caches(self, job_id: str) -> None:
        for stage in self.stages.values():
            stage.end_job(job_id)
        self.jobs.pop(job_id, None)

    def _end_local(self, job_id: str, epoch: int) -> None:
        state = self.jobs.get(job_id)
        if state is not None and state.epoch > epoch:
            return  # an order for a route the job has left: its new epoch's caches stay
        self._drop_caches(job_id)
        self.ended[job_id] = max(epoch, self.ended.get(job_id, -1))
        self.ended.move_to_end(job_id)
        while len(self.ended) > _ENDED_MEMORY:
            self.ended.popitem(last=False)

    def end_job(self, *, job_id: str, epoch: int, sig: bytes) -> None:
        """An end_job order: free the job's caches if the core signed the order."""
        try:
            if not isinstance(job_id, str) or not isinstance(epoch, int):
                raise InvalidRequest("malformed end_job order")
            auth.check(self.core_key, auth.END_ORDER, end_order_part(job_id, epoch), sig,
                       what=f"end_job for {job_id}")
        except AzuError as exc:
            self._refuse(exc.message, why=f"end_order_{exc.code}")
            return
        with self.lock:
            self._end_local(job_id, epoch)

    def ping(self, key: str, value: str) -> None:
        """Answer a health check (the core writes ``value`` under ``key`` once it hears back)."""
        self.report("pong", {"key": key, "value": value})

    def sweep_idle(self, *, now: float | None = None) -> list[str]:
        """Free the caches of jobs untouched for ``kv_idle_s`` (a job whose end never reached us).

        Skipped while a step runs (the next beat sweeps): the heartbeat thread calls this, and a heartbeat
        held up behind a long forward would make the core find this worker silent, and lost."""
        now = time.time() if now is None else now
        if not self.lock.acquire(blocking=False):
            return []
        try:
            idle = [j for j, s in self.jobs.items() if now - s.touched > self.kv_idle_s]
            for job_id in idle:
                self._drop_caches(job_id)
        finally:
            self.lock.release()
        return idle

    def job_length(self, job_id: str) -> dict[str, int]:
        """Positions each held stage has cached for ``job_id`` (diagnostics and tests)."""
        with self.lock:
            return {f"{m} {span}": s.job_length(job_id) for (m, span), s in self.stages.items()}


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
