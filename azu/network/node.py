"""A worker node's step runtime: admit, batch, forward, send on, finish, end jobs, heartbeat.

Framework-free: ``workers/stage.py`` (Celery) calls ``WorkerNode.process_pending`` when woken and ``load``
on a load order; the core's order to end a job comes in the inbox beside the steps (``end_job``);
``start_heartbeat`` runs beside them. Fetching a span's files
is azu.network.loading, the mailbox azu.network.inbox, the command line azu.cli.worker.

One wake-up takes *every* step payload waiting for this worker, so the decode steps of all jobs at the same
stage run as one ``Stage.forward_batch``. Each payload is checked before any cache is touched: it must come in
a bundle signed by a sender the job's grant allows (the core, or the hop before), the grant must be the core's
(checked once per grant), unexpired and name this worker (and its key) at the payload's hop, and its position
must be the one the stage's cache has reached. A payload already applied (a redelivery) is answered from the
stage's last output for that job instead of being run again, so a cache never advances twice.

A worker writes no facts: what the core must know (tokens, loads, failures, refusals, heartbeats) goes as
signed reports on its own list, ``azu:reports:from:<id>`` (azu.network.collector). The last hop hands the next
step to hop 0 itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from azu import metrics
from azu.config import Settings
from azu.engine.span import Span
from azu.errors import AzuError, Forbidden, InvalidRequest
from azu.network import auth, batching, direct, directory, inbox, jobs, keys, loading, steptrace
from azu.network.dispatch import Dispatcher, control_queue, send_forward, worker_queue
from azu.network.inbox import Inbox
from azu.network.reports import push as push_reports
from azu.network.reports import sign as sign_report
from azu.network.wire import (
    EndOrder,
    JobGrant,
    StepBundle,
    StepPayload,
    end_order_part,
    evidence_order_part,
    pack_tensor,
    unpack_inbox,
    unpack_tensor,
)
from azu.verification.commitment import CommitBuffer
from azu.verification.evidence import EvidenceStore

if TYPE_CHECKING:
    import torch
    from nacl.signing import SigningKey

    from azu.engine.stage import Stage
    from azu.tokenization import StreamDecoder

log = logging.getLogger(__name__)

_ENDED_MEMORY = 100_000  # ended job ids remembered (a few MB at most)
WAIT_SLICE_S = 0.5  # an idle session's longest wait on its inbox: how soon it sees it should end
IDLE_MOVE_WAIT_S = 0.01  # its wait between two idle moves of a stage's weights (``_move_layouts_when_idle``)

StageId = tuple[str, Span]  # (model id, span): what a held stage is known by here and in the directory


@dataclass
class _JobState:
    """What this worker remembers of a job between steps (beside the stages' KV caches)."""

    touched: float = 0.0
    interval: float = 0.0  # seconds between its last two steps here (how long to wait for the next)
    epoch: int = 0  # the grant epoch the job's caches here belong to (a re-route starts a new one)
    decoder: StreamDecoder | None = None  # when the job has stop strings (last stage)
    # hop -> (step, what that step produced: the next hop's payloads (a prompt's parts), or the sampled
    # token at the last hop), replayed when the same step arrives again
    last_out: dict[int, tuple[int, list[StepPayload] | int]] = field(default_factory=dict)
    # hop -> the commitments of what this worker produced at that hop (azu.verification), sent per chunk
    commits: dict[int, CommitBuffer] = field(default_factory=dict)


@dataclass
class _Ran:
    """A step run (or replayed) here: its payload (a prompt's part: ``pos`` where the part starts), and what
    came out."""

    step: StepPayload
    out: Any  # hidden state (fresh), or what is answered again: the payloads sent on, or the token
    replay: bool


class WorkerNode:
    def __init__(self, r: redis.Redis, *, worker_id: str, dispatch: Dispatcher, device: str = "cpu",
                 dtype: str | None = None, cache_dir: str | Path = ".azu/cache",
                 registry_url: str = "http://127.0.0.1:8002", p2p_url: str | None = None,
                 wallet: str | None = None, memory_limit: int | None = None,
                 max_cached_tokens: int = 32768, kv_idle_s: float = 600.0, linger_s: float = 10.0,
                 session_s: float = 2.0, heartbeat_s: float = 3.0, key: SigningKey | None = None,
                 core_public_key: str | None = None, reports_base: str = keys.REPORTS,
                 evidence_bytes: int = 256 << 20, evidence_s: float = 1800.0, prefill_chunk: int = 128,
                 cpu_kernels: str = "auto", decode_graphs: str = "auto",
                 background_sends: bool = False, p2p_listen: str | None = None,
                 step_trace: str | Path | None = None) -> None:
        from nacl.signing import SigningKey

        self.r = r
        self.key = key or SigningKey.generate()
        self.public_key = auth.public_hex(self.key)
        self.core_key = core_public_key or auth.core_public_key()
        # Its reports go to its own list (the only one its login may push to) under this base, and a hint
        # with them (azu.network.reports); tests keep in-process nodes apart with a base of their own.
        self.reports_base = reports_base
        self.grant_cache = auth.GrantCache()
        self.grants: dict[bytes, JobGrant] = {}  # verified grants by their bytes (bounded in _admit_bundle)
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
        self.session_s = session_s  # how often a forward task looks for a waiting control message
        self.heartbeat_s = heartbeat_s
        self.prefill_chunk = prefill_chunk  # prompt positions a stage runs per turn (azu.network.batching)
        self.cpu_kernels = cpu_kernels  # the linears' kernel on a CPU (azu.engine.kernels)
        self.decode_graphs = decode_graphs  # one-token steps as CUDA graph replays (azu.engine.graphs)
        # Signed reports not sent yet, tokens and commitments: the next send to Redis takes them all.
        self._unsent_tokens: list[bytes] = []
        self._unsent_commits: list[bytes] = []
        self._reports_queued = False  # a send that will take them is on the outbox already
        # Hand-overs to each worker still queued for Redis on the outbox: none goes directly to that worker
        # meanwhile (it would overtake them: a prompt's later part before its earlier ones is dropped).
        self._queued_for_redis: Counter[str] = Counter()
        self._commits_lock = threading.Lock()  # the outbox's thread gives back those of a failed send
        self._control_seen = (-math.inf, False)  # (when, whether) a control message was last seen waiting
        self._control_asked = -math.inf  # when a hand-over last took the question along
        # Hand-overs go out on a thread of their own in a worker process (inbox.Outbox).
        self.outbox = inbox.Outbox(background=background_sends)
        self._more_to_run = False  # whether the round has more batches to run after the one handed over
        self._held: batching.StepQueue | None = None  # the running session's queue (the idle sweep spares it)
        # The direct path (azu.network.direct): with a P2P address, hand-overs come straight from the hop
        # before (``frames``, from the listener's threads) and go straight to the next hop.
        self.p2p_listen = p2p_listen
        self.frames = inbox.LocalFrames() if self.p2p_listen else None
        self.listener: direct.Listener | None = None
        self.connections = direct.Connections(self.key) if background_sends else None
        # Whether a session runs or a message to start one is on its way (a frame that finds neither wakes
        # this worker); read and written under _wake_lock, with the frames queue and the inbox's release.
        self._awake = False
        self._wake_lock = threading.Lock()
        self._direct_grant_cache = auth.GrantCache(size=4096)  # the listener's (checks run one at a time)
        self.inbox = Inbox(r, worker_id, self.frames)
        self.stages: dict[StageId, Stage] = {}
        self.stage_bytes: dict[StageId, int] = {}
        self.folders: dict[str, Path] = {}  # model id -> its local shard folder (tokenizer files too)
        self.jobs: dict[str, _JobState] = {}
        # The signed bundles received from the hop before, kept to prove what this worker was given.
        self.evidence = EvidenceStore(max_bytes=evidence_bytes, max_age_s=evidence_s)
        # Jobs that ended here lately, with the epoch they ended at: a late duplicate of one of their steps
        # must not revive a cache (a step of a later epoch, after a re-route, may).
        self.ended: OrderedDict[str, int] = OrderedDict()
        self.started_at = time.time()
        # Stage calls come from the task thread; the heartbeat thread only sweeps idle caches under it.
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._ending = threading.Event()  # the worker is shutting down: an idle session ends (end_sessions)
        self._thread: threading.Thread | None = None
        self.metrics = metrics.worker_metrics()
        metrics.watch_node(self)
        self.trace = steptrace.StepTrace.in_folder(step_trace, worker_id)  # off unless AZU_STEP_TRACE

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
                   session_s=w.session_s, heartbeat_s=w.heartbeat_s, key=key,
                   evidence_bytes=settings.verify.evidence_bytes, evidence_s=settings.verify.evidence_s,
                   prefill_chunk=w.prefill_chunk, cpu_kernels=w.cpu_kernels, decode_graphs=w.decode_graphs,
                   background_sends=True,
                   p2p_listen=w.p2p_listen or (_listen_on(w.p2p_url) if w.p2p_url else None),
                   step_trace=w.step_trace)

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
        return sign_report(self.key, self.worker_id, kind, body)

    def report(self, kind: str, body: dict[str, Any], *, pipe: Any = None) -> None:
        """Send the core a signed report (in ``pipe`` if given, else now)."""
        push_reports(pipe if pipe is not None else self.r, self.worker_id, [self.signed_report(kind, body)],
                     base=self.reports_base)

    def start_heartbeat(self, interval: float | None = None) -> None:
        # A new process holds no caches: payloads left for an earlier one with this id are useless (their
        # jobs fail on the position check or by the watchdog), and its wake key must not stall senders.
        self.inbox.clear()
        self.start_direct()
        self.heartbeat()
        every = self.heartbeat_s if interval is None else interval

        def run() -> None:
            while not self._stop.wait(every):
                try:
                    self.heartbeat()
                    self.sweep_idle()
                    self._wake_for_frames()
                except Exception:  # a Redis hiccup must not kill the heartbeat for good
                    log.exception("heartbeat failed")

        self._thread = threading.Thread(target=run, name="azu-heartbeat", daemon=True)
        self._thread.start()

    def start_direct(self) -> None:
        """Listen for other workers' hand-overs on the P2P address (azu.network.direct), if there is one."""
        if self.frames is None or self.listener is not None:
            return
        assert self.p2p_listen
        self.listener = direct.Listener(self.key, direct.parse_address(self.p2p_listen),
                                        on_frame=self._on_frame, admit=self._admit_frame).start()
        log.info("worker %s takes hand-overs directly on %s:%d (advertised as %s)", self.worker_id,
                 *self.listener.address, self.p2p_url)

    def _admit_frame(self, blob: bytes, sender_key: str) -> bool:
        """Whether a direct frame may be queued (the listener's thread): a bundle of steps for this worker,
        from the worker its core-signed grant names for the connection's key. The bundle's own signature and
        every payload are checked later, by the session, as for the Redis path (``_admit_bundle``)."""
        bundle = unpack_inbox(blob)
        if not isinstance(bundle, StepBundle) or bundle.sender == auth.CORE:
            return False

        def check(grant: bytes, signature: bytes) -> None:  # before the grant is parsed; this thread's cache
            self._direct_grant_cache.check(self.core_key, grant, signature)

        first = StepPayload.unpack(bundle.steps[0], check=check)
        return (first.here.worker_id == self.worker_id and first.g.key_of(bundle.sender) == sender_key
                and first.g.expires_at > time.time())

    def _on_frame(self, blob: bytes) -> None:
        """A direct frame for the session; wakes this worker (a Celery message to itself) if none runs.
        Waits while the frames queued are at their cap (outside the lock: the session's release takes it)."""
        assert self.frames is not None
        if not self.frames.room(len(blob)):
            raise ConnectionError("the session takes no frames: this connection is closed")
        with self._wake_lock:
            self.frames.put(blob)
            if self._awake:
                return
            self._awake = True
        self._wake_self()

    def _wake_self(self) -> None:
        """Start a session for the frames queued (a Celery message to this worker). If the broker refuses,
        the worker is not awake: the next frame, or the heartbeat (``_wake_for_frames``), tries again."""
        try:
            send_forward(self.worker_id, [], dispatch=self.dispatch)
        except Exception as exc:
            log.warning("worker %s could not wake itself for direct frames: %s", self.worker_id, exc)
            with self._wake_lock:
                self._awake = False

    def _wake_for_frames(self) -> None:
        """Frames queued with no session running or coming start one (the heartbeat, a failed session)."""
        if self.frames is None:
            return
        with self._wake_lock:
            if self._awake or not len(self.frames):
                return
            self._awake = True
        self._wake_self()

    def end_sessions(self) -> None:
        """The worker is shutting down (Celery waits for the running task): a session running ends once it
        has nothing to run, instead of lingering. Any thread; the session sees it within ``WAIT_SLICE_S``."""
        self._ending.set()

    def stop(self) -> None:
        self._stop.set()
        self._ending.set()
        if self.listener is not None:
            self.listener.stop()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.outbox.drain()  # what was handed over still goes out
        except Exception as exc:  # stopping anyway; the watchdog recovers the steps
            log.warning("worker %s: hand-overs lost at shutdown: %s", self.worker_id, exc)
        if self.connections is not None:
            self.connections.close()
        self.inbox.close()
        self.trace.flush()

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
                                         max_cached_tokens=self.max_cached_tokens, kernels=self.cpu_kernels,
                                         graphs=self.decode_graphs)
        with self.lock:
            self.stages[(model_id, span)] = stage
            self.stage_bytes[(model_id, span)] = size
            self.folders[model_id] = folder

    def model_folder(self, model_id: str) -> Path:
        return loading.model_folder(self.cache_dir, model_id)

    # --- steps -----------------------------------------------------------------------------------
    def process_pending(self, blobs: list[bytes] | None = None) -> int:
        """Run the payloads a wake-up brought, then every payload left for this worker meanwhile, in rounds:
        each round takes what arrived (without waiting) and runs one batch per stage, a micro-batch of
        decode steps then a chunk of the prompts waiting (azu.network.batching), each handed on as soon as
        it has run, so the next stage works while this one runs its next batch.

        With nothing to run it waits on its inbox while a job of this worker is in flight (``_due_by``):
        the job's next step is due, and taking it from the list costs one Redis wake-up instead of a Celery
        message each way, whatever the round trip between hosts. Every ``session_s`` it looks at its control
        queue: if a load order (or another control message) waits there, it finishes what it holds and hands
        the rest to a new message on its own queue, so the control message gets its turn. Returns how many
        steps were run or replayed."""
        with self._wake_lock:
            self._awake = True
        try:
            return self._session(blobs)
        except BaseException:
            # Frames that came meanwhile must still start a session: none may be coming after this one.
            with self._wake_lock:
                self._awake = False
            self._wake_for_frames()
            raise
        finally:
            self._held = None
            with self.lock:
                self._flush_commits()

    def _session(self, blobs: list[bytes] | None) -> int:
        queue = self._held = batching.StepQueue(chunk=self.prefill_chunk)
        done = self._process(blobs, queue) if blobs else 0
        deadline = time.monotonic() + self.session_s

        def past_deadline_with_control() -> bool:
            """Whether the session should end: past its deadline with a control message waiting. Past it
            with none waiting, the deadline moves on: ending the session costs a Celery message to this
            worker and back through the broker, several round trips that a job's next step would wait for
            (between distant hosts, more than the step itself: bench/latency.py)."""
            nonlocal deadline
            if time.monotonic() <= deadline:
                return False
            if self._control_waiting():
                return True
            deadline = time.monotonic() + self.session_s
            return False

        idle_since = time.monotonic()  # when this session last had something to run
        flushed_for = None  # the idle_since whose quiet the held reports went out in
        moving = False  # idle, a stage still moves its weights back to one user's layout (short waits)
        while True:
            # Ending: a control message waits past the deadline, or the worker is stopping (end_sessions):
            # what is held is finished, nothing new is taken, what comes goes back to the list by message.
            ending = past_deadline_with_control() or self._ending.is_set()
            if queue.runnable():
                # Work in hand: take what arrived meanwhile without waiting, then the next round.
                more = [] if ending else self.inbox.take()
                done += self._process(more, queue)
                idle_since = time.monotonic()
                continue
            now = time.monotonic()
            due_in = self._step_due_in(time.time())
            # Idle, it lingers (``linger_s``): the next job's first step then finds this worker awake, taken
            # from its list at once instead of after a Celery message and a new session (bench/ttft_idle.py).
            # In slices, so a worker told to stop (``end_sessions``) ends its session soon.
            linger_left = min(self.linger_s - (now - idle_since), WAIT_SLICE_S)
            wait_s = min(max(linger_left, due_in), deadline - now) if self.linger_s > 0 and not ending else 0
            if moving:
                wait_s = min(wait_s, IDLE_MOVE_WAIT_S)
            # Lingering (no step due), the wait brings the look at the control queue along (``_lingering``).
            look = control_queue(self.worker_id) if due_in <= 0 else None
            more = self.inbox.wait(wait_s, control=look) if wait_s > 0 else self.inbox.take()
            moving = False  # a short wait is for the wait right after an idle move only
            ending = past_deadline_with_control() or self._ending.is_set()  # the wait ends at the deadline
            if more:
                if ending:  # the wake key stays set: senders keep using the list
                    self.inbox.keep_awake()
                    send_forward(self.worker_id, more, dispatch=self.dispatch)
                    return done
                done += self._process(more, queue)
                idle_since = time.monotonic()
                continue
            if self._step_due_in(time.time()) > 0:
                if not ending:
                    continue  # a job's next step is still due: wait on
                # A control message waits (or the worker stops) and a step is due: wake this worker again by
                # message (after the control message); the wake key stays set, so senders keep using the list.
                self.inbox.keep_awake()
                send_forward(self.worker_id, [], dispatch=self.dispatch)
                return done
            if not ending and self._lingering(idle_since):
                if flushed_for != idle_since:  # turning idle: a job's last commitments go out now
                    self._flush_when_idle()
                    flushed_for = idle_since
                moving = self._move_layouts_when_idle()
                continue
            more = self.inbox.settle()
            if more:
                done += self._process(more, queue)
                idle_since = time.monotonic()
                continue
            if self._release():
                return done

    def _move_layouts_when_idle(self) -> bool:
        """Idle: each stage whose weights moved to its batch layout moves the next blocks back to one user's
        (azu.engine.kernels.LayoutSwitch), so the next lone user finds them there; whether any has more to
        move. A step's worth of blocks at a time (tens of ms here): a job that comes meanwhile waits at most
        that long."""
        with self.lock:
            stages = list(self.stages.values())
        return any([stage.move_layouts_when_idle() for stage in stages])  # a list: every stage moves

    def _flush_when_idle(self) -> None:
        """Send the reports held (a job's final commitments wait for the next hand-over or the session's end)
        as the session turns idle, not when its linger is over: the verifier waits for them. A failed send
        gives them back for the next one."""
        with self.lock:
            try:
                self._flush_commits()
            except Exception as exc:
                log.warning("worker %s: reports not sent yet (sent again later): %s", self.worker_id, exc)
        self.trace.flush()

    def _lingering(self, idle_since: float) -> bool:
        """Whether a session with nothing to run or due waits on (for ``linger_s`` since ``idle_since``): not
        when the worker is stopping, nor when a control message waits. Idle, it looks at its control queue
        every wait slice, in the wait's own round trip (``Inbox.wait``; a look of its own when the wait
        brought none), which also keeps the wake key: a load order or a ping is not held up by a lingering
        session."""
        if self.linger_s <= 0 or self._ending.is_set() or time.monotonic() - idle_since >= self.linger_s:
            return False
        return not self._control_waiting(within=WAIT_SLICE_S)

    def _release(self) -> bool:
        """Stop taking (``Inbox.release``) unless something came meanwhile, through Redis or directly: a frame
        that comes after this finds the worker not awake and wakes it (``_on_frame``)."""
        if self.frames is None:
            return self.inbox.release()
        with self._wake_lock:
            if len(self.frames) or not self.inbox.release():
                return False
            self._awake = False
            return True

    def _control_waiting(self, *, within: float | None = None) -> bool:
        """Whether a load order, evidence order or ping waits on this worker's control queue (its Celery
        list), or that cannot be told: then the session ends, and the message gets its turn. Otherwise the
        session goes on, and the wake key is kept (senders keep using the list).

        A hand-over of the last session brought the answer (``_hand_over`` takes the question along every
        half session): a worker in the middle of a job does not pay a round trip of its own for it, which
        between distant hosts is a step's delay; nor does an idle session, whose waits bring it. ``within``:
        an answer at most this old (default: ``session_s``)."""
        seen_at, waiting = max(self._control_seen, self.inbox.control_seen)  # the latest answer
        if time.monotonic() - seen_at <= (self.session_s if within is None else within):
            return waiting
        waiting = self.inbox.control_waiting(control_queue(self.worker_id))
        self._control_seen = (time.monotonic(), waiting)
        return waiting

    def _step_due_in(self, now: float) -> float:
        """Seconds until the last in-flight job's next step here is overdue (``_due_by``), 0 if none is in
        flight; always 0 with ``linger_s`` 0 (tests that step by hand)."""
        if self.linger_s <= 0:
            return 0.0
        # A copy taken at once (the heartbeat thread's idle sweep may remove jobs meanwhile: this runs outside
        # the lock, between rounds).
        states = list(self.jobs.values())
        return max(0.0, max((self._due_by(state) for state in states), default=now) - now)

    def _due_by(self, state: _JobState) -> float:
        """When a job's next step here is overdue: twice its observed step interval after its last step (a
        job whose interval is not known yet, or a slow one, counts for a whole session)."""
        window = 2 * state.interval if state.interval else self.session_s
        return state.touched + min(window, self.session_s)

    def _process(self, blobs: Iterable[bytes], queue: batching.StepQueue | None = None) -> int:
        """Admit ``blobs``' payloads to ``queue`` and run one round of it (one batch per stage); with no
        queue given, run all they hold to the end."""
        whole = queue is None
        if queue is None:
            queue = batching.StepQueue(chunk=self.prefill_chunk)
        groups: dict[StageId, list[StepPayload]] = defaultdict(list)
        ends: list[EndOrder] = []
        blobs = list(blobs)
        if blobs:
            self.trace.mark("taken")
            for blob in blobs:
                for step in self._admit_bundle(blob, ends):
                    groups[(step.model_id, step.here.span)].append(step)
            self.trace.mark("admitted")
        done = 0
        with self.lock:
            for order in ends:  # before the steps: a re-routed job's new epoch may come in the same take
                if self._end_local(order.job_id, order.epoch):
                    queue.drop_job(order.job_id)  # rows of the ended job still queued in this session
            for stage_id, steps in groups.items():
                done += self._run_group(stage_id, steps, queue)
            if groups:
                self.trace.mark("queued")
            done += self._run_round(queue)
            while whole and queue.runnable():
                done += self._run_round(queue)
            if whole:
                self._flush_commits()
        return done

    def _refuse(self, reason: str, job_id: str | None = None, *, why: str = "other") -> None:
        log.warning("worker %s refused a step: %s", self.worker_id, reason[:500])
        self.metrics.refused.labels(metrics.label(why)).inc()
        self.report("refused", {"reason": reason[:500], **({"job_id": job_id} if job_id else {})})

    def _admit_bundle(self, blob: bytes, ends: list[EndOrder]) -> list[StepPayload]:
        """The payloads of a signed bundle this worker may run (a core-signed end order found instead goes
        on ``ends``); every refusal reported."""
        if len(self.grants) > 4096:
            self.grants.clear()
        try:
            bundle = unpack_inbox(blob)
            if isinstance(bundle, EndOrder):
                if self._core_order("end", bundle.job_id, bundle.epoch, bundle.sig):
                    ends.append(bundle)
                return []
            # Each grant's signature checked before it is parsed (once: ``grants`` holds those checked).
            parsed = bundle.payloads(grants=self.grants, check=self._check_grant)
            payloads = [p for p in parsed if isinstance(p, StepPayload)]
            sender_key = self._sender_key(bundle.sender, payloads)
            auth.check(sender_key, auth.STEPS, bundle.signed_part(), bundle.sig,
                       what=f"step bundle from {bundle.sender}")
            self.trace.mark("verified")
        except AzuError as exc:
            self._refuse(exc.message, why=f"bundle_{exc.code}")
            return []
        out = []
        now = time.time()
        for p in parsed:
            if not isinstance(p, StepPayload):  # its grant is not the core's
                self._refuse(p.message, why=f"payload_{p.code}")
                continue
            try:
                self.grants[p.grant] = p.g  # kept only now that its signature is checked
                self._admit(p, bundle.sender, sender_key, now)
                out.append(p)
            except AzuError as exc:
                self._refuse(exc.message, p.job_id, why=f"payload_{exc.code}")
        # Hidden states from the hop before: keep the signed bundle as proof of what this worker was given.
        kept = {(p.job_id, p.g.epoch) for p in out if p.hop > 0}
        if kept:
            self.evidence.add(blob, kept)
        return out

    def _check_grant(self, grant: bytes, signature: bytes) -> None:
        self.grant_cache.check(self.core_key, grant, signature)

    def _sender_key(self, sender: str, payloads: list[StepPayload]) -> str:
        """The key a bundle's sender must have signed with: the core's, or the one a core-signed grant of
        one of its payloads names for the sender."""
        if sender == auth.CORE:
            return self.core_key
        for p in payloads:  # their grants' signatures are checked (StepBundle.payloads)
            key = p.g.key_of(sender)
            if key is not None:
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
        # A later hop gets the epoch's prompt in parts, each as the hop before ran it (any part that starts
        # inside the prompt; _run_group runs it only where the positions held end).
        in_prompt = first and p.hop > 0 and 0 <= p.pos < p.end
        if p.pos != expected_pos and not in_prompt:
            raise Forbidden(f"{what}: position {p.pos} is not step {p.step}'s ({expected_pos})")
        if p.hop == 0 and (not isinstance(p.x, list) or (not first and len(p.x) != 1)
                           or (first and len(p.x) != g.sampling.prompt_len + g.start)):
            raise InvalidRequest(f"{what}: hop 0 takes the prompt, then one token id per step")
        if p.hop > 0 and not isinstance(p.x, bytes):
            raise InvalidRequest(f"{what}: a later hop takes a hidden state")
        if (g.model_id, p.here.span) not in self.stages:
            raise AzuError(f"worker {self.worker_id} does not hold {g.model_id} {p.here.span}")

    def _run_group(self, stage_id: StageId, steps: list[StepPayload], queue: batching.StepQueue) -> int:
        """Sort one stage's admitted payloads: a fresh step joins ``queue`` (``_run_round`` runs it), one
        already applied is answered again now from its remembered output, anything else is dropped or fails
        its job. Returns how many were answered again."""
        stage = self.stages[stage_id]
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
                # The core re-routed the job: what this worker cached or queued for the old route is
                # dropped, the new epoch starts from its replay (position 0).
                self._drop_caches(s.job_id)
                queue.drop_job(s.job_id)
                replays = [f for f in replays if f.job_id != s.job_id]
                state = None
            if state is None:
                state = self.jobs[s.job_id] = _JobState(epoch=epoch)
            queued = queue.item(stage_id, s.job_id)
            have = stage.job_length(s.job_id)
            if queued is not None and (queued.step.g.epoch != epoch or have != queued.step.pos + queued.done):
                # Its cache was freed since it was queued (an end order, the idle sweep): what is queued no
                # longer follows what the stage holds, and a part must not run on top of another cache.
                log.info("job %s: queued step %s no longer matches the cache; dropped", s.job_id,
                         queued.step.step)
                queue.remove(stage_id, s.job_id)
                queued = None
            follows = queued is not None and queued.step.step == s.step and not queued.complete \
                and s.pos == queued.step.pos + queued.size  # the next part of a prompt queued here
            if have == s.pos or follows:
                if queued is not None and not follows:
                    # Two copies of one step before it ran (a replay crossed the original): run it once.
                    log.info("job %s step %s: duplicate payload dropped", s.job_id, s.step)
                    continue
                try:
                    x = torch_input(s.x)
                    if not s.fits(x):
                        raise InvalidRequest(f"job {s.job_id} step {s.step}: an input of shape "
                                             f"{tuple(x.shape)} from position {s.pos} does not fit the step "
                                             f"(it ends at {s.end})")
                except AzuError as exc:
                    self._job_failed(s.job_id, exc.message)
                    continue
                if state.touched:
                    state.interval = now - state.touched
                state.touched = now
                if queued is not None:
                    queued.extend(x)
                else:
                    queue.add(stage_id, s, x, total=s.end - s.pos)
                continue
            state.touched = now
            last = state.last_out.get(s.hop)
            if have > s.pos and last is not None and last[0] == s.step:
                replays.append(s)  # already applied: answer again, don't run again
            elif have > s.pos:
                log.info("job %s step %s: stale payload (cache at %d, payload at %d)", s.job_id, s.step,
                         have, s.pos)
            elif s.step == s.g.start and s.hop > 0:
                # A part of the prompt past the positions held: one before it was lost on the way (a failed
                # hand-over). Dropped: the job stalls as on a lost step, and the watchdog replays it.
                log.warning("job %s: a part of the prompt from position %d, held %d; dropped", s.job_id,
                            s.pos, have)
            else:
                self._job_failed(s.job_id, f"worker {self.worker_id} lost the job's cache (at {have} "
                                 f"positions, step {s.step} needs {s.pos})")
        if not replays:
            return 0
        self.metrics.steps.labels("replay").inc(len(replays))
        ran = [_Ran(s, self._answer_again(s), replay=True) for s in replays]
        if stage_id[1].head:
            self._finish_steps(ran)
        else:
            self._send_on(ran)
        return len(ran)

    def _answer_again(self, s: StepPayload) -> Any:
        """What this stage produced for ``s``, a payload it has applied already: the sampled token at the last
        hop, else the payloads it sent on for the positions ``s`` brings. Only those: a prompt went on in
        parts, and answering every duplicate part with all of them would multiply at each later hop."""
        sent = self.jobs[s.job_id].last_out[s.hop][1]
        if not isinstance(sent, list) or len(sent) == 1:
            return sent
        lo = s.pos
        try:
            x = torch_input(s.x)
        except AzuError:
            return []
        if x.ndim == 0:
            return []
        hi = lo + int(x.shape[0])
        ends = [p.pos for p in sent[1:]] + [s.end]
        return [p for p, end in zip(sent, ends, strict=True) if p.pos < hi and end > lo]

    def _run_round(self, queue: batching.StepQueue) -> int:
        """One turn of every stage with work queued: a micro-batch of decode steps, then a chunk of the
        prompts waiting, or both as one batch where that pads little (azu.network.batching); what each batch
        finished is handed on (or sampled) before the next batch runs."""
        done = 0
        now = time.time()
        for stage_id in list(queue.stages()):
            stage = self.stages[stage_id]
            queued = queue.decode_batch(stage_id, 1 << 30)  # every decode step queued here, in batch order
            decode = queued[: self._micro_batch_rows(queued, now)]
            # Alone: no decode step here, and no job in flight at this worker but those whose prompts wait.
            alone = not decode and self._jobs_due(now) <= queue.prompt_jobs(stage_id)
            prompt = queue.prompt_batch(stage_id, besides=decode, alone=alone)
            batches = ([decode + prompt] if batching.mixes_cheaply(decode, prompt) else [decode, prompt])
            for rows in batches:
                if not rows:
                    continue
                finished = [r.item.step for r in rows if r.last]  # before the forward moves the rows on
                ran, seconds = self._forward(stage_id, stage, rows, queue)
                # More to run while this batch travels: what is queued, or other jobs' steps due soon.
                self._more_to_run = bool(queue) or self._jobs_due(now) > len(ran)
                if stage_id[1].head:
                    self._finish_steps(ran)
                else:
                    self._send_on(ran)
                # The metrics once the batch is on its way: right after a forward, whose weights have pushed
                # this process's own data out of the CPU's caches, each line of Python costs several times
                # its usual time, and the next hop waits for what runs before the hand-over.
                self._observe_forward(seconds, len(rows), finished)
                done += len(ran)
        return done

    def _micro_batch_rows(self, queued: list[batching.Row], now: float) -> int:
        """The decode rows of one batch at a stage whose queued decode steps are ``queued``: the jobs in
        flight (queued there, or due back within two step intervals) over the stages of their route, and
        every job's last step queued there (azu.network.batching.micro_batch_rows)."""
        if not queued:
            return 1
        hops = len(queued[0].item.step.g.route)
        return batching.micro_batch_rows(max(len(queued), self._jobs_due(now)), hops,
                                         ending=sum(1 for r in queued if batching.last_step(r.item.step)))

    def _jobs_due(self, now: float) -> int:
        """Jobs in flight here: those whose next step here is due (``_due_by``)."""
        return sum(1 for st in self.jobs.values() if now < self._due_by(st))

    def _job_failed(self, job_id: str, reason: str) -> None:
        log.warning("worker %s: job %s failed: %s", self.worker_id, job_id, reason)
        self.report("job_failed", {"job_id": job_id, "reason": reason[:2000]})

    def _forward(self, stage_id: StageId, stage: Stage, rows: list[batching.Row],
                 queue: batching.StepQueue) -> tuple[list[_Ran], float]:
        """Run ``rows`` as one batch (job by job if the batch fails before it touched a cache) and return
        the steps they finished: a prompt's output once its last chunk has run (hidden states of all its
        positions, or the logits of its last one at the head); and the seconds the batch took."""
        self.trace.mark("forward")
        started = time.perf_counter()
        outs: list[Any] = []
        try:
            if len(rows) > 1:
                outs = stage.forward_batch([(r.item.step.job_id, r.x) for r in rows])
            else:
                outs = [stage.forward(rows[0].item.step.job_id, rows[0].x)]
        except Exception as exc:
            if len(rows) == 1:
                outs = [exc]
            else:
                log.exception("batched forward failed; running the steps one by one")
                outs = []
                for r in rows:
                    job_id = r.item.step.job_id
                    if stage.job_length(job_id) != r.item.step.pos + r.item.done:
                        outs.append(AzuError("its cache was dropped with a failed batch"))
                        continue
                    try:
                        outs.append(stage.forward(job_id, r.x))
                    except Exception as single:
                        outs.append(single)
        seconds = time.perf_counter() - started
        self.trace.mark("forwarded")
        ran: list[_Ran] = []
        for r, out in zip(rows, outs, strict=True):
            item = r.item
            job_id = item.step.job_id
            if isinstance(out, Exception):
                queue.remove(stage_id, job_id)
                reason = out.message if isinstance(out, AzuError) else f"{type(out).__name__}: {out}"
                self._job_failed(job_id, f"worker {self.worker_id}: {reason}")
                continue
            last = r.last
            first_pos = item.step.pos + item.done
            item.done += r.n
            if last:
                queue.remove(stage_id, job_id)
            if not stage_id[1].head:
                # Every chunk goes on as it has run: the next stage runs it while this one runs the next.
                ran.append(_Ran(replace(item.step, pos=first_pos), out, replay=False))
            elif last:
                ran.append(_Ran(item.step, out, replay=False))
        return ran, seconds

    def _observe_forward(self, seconds: float, rows: int, finished: list[StepPayload]) -> None:
        self.metrics.step_seconds.observe(seconds)
        self.metrics.batch_size.observe(rows)
        prefill = sum(1 for s in finished if s.step == s.g.start)
        if prefill:
            self.metrics.steps.labels("prefill").inc(prefill)
        if len(finished) - prefill:
            self.metrics.steps.labels("decode").inc(len(finished) - prefill)

    def _hand_over_parts(self, nexts: list[StepPayload], *, reports: list[bytes] | None = None) -> None:
        """``_hand_over`` of ``nexts`` in as many bundles as a receiver may read (``jobs.parts``: one, unless
        thousands of steps or large states), ``reports`` with the last."""
        *before, last = list(jobs.parts(nexts)) or [[]]
        for part in before:
            self._hand_over(list(part))
        self._hand_over(list(last), reports=reports)

    def _hand_over(self, nexts: list[StepPayload], *, reports: list[bytes] | None = None) -> None:
        """Send steps on, in one bundle per next worker signed by this worker: straight to the workers with a
        direct path (now), the rest through Redis in one round trip with ``reports`` and every other report
        not sent yet (commitments), on the outbox.

        Reports wait in two queues (tokens, commitments) and each send takes all that wait when it runs, so
        while one round trip is out the next carries everything that came meanwhile: between distant hosts,
        a round trip per hand-over would fall behind a worker that hands over more often than that (16
        streams at 50 ms: the tokens reached the core seconds late). Taken in order, put back in front if a
        send fails: a job's token reports stay in order."""
        self.trace.mark("handing")
        if reports:
            with self._commits_lock:
                self._unsent_tokens += reports
        bundles = jobs.bundles(nexts, sender=self.worker_id, key=self.key) if nexts else {}
        went_direct = self._send_direct(bundles, nexts)
        rest = {w: b for w, b in bundles.items() if w not in went_direct}  # through Redis
        if not rest:
            if self._reports_queued:
                return  # the send queued before this one has not taken the reports yet: it takes these too
            self._reports_queued = True
        with self._commits_lock:
            self._queued_for_redis.update(rest.keys())

        def sent_to_redis() -> None:
            with self._commits_lock:
                self._queued_for_redis -= Counter(rest.keys())  # keeps only the counts still above zero

        started = False

        def send() -> None:  # on the outbox's thread: this thread goes on with its next batch
            nonlocal started
            started = True
            try:
                deliver()
            finally:
                sent_to_redis()

        def deliver() -> None:
            if not rest:
                self._reports_queued = False  # before taking: reports queued from now on need another send
            carried = self._take_unsent_commits()
            out = [*carried[0], *carried[1]]
            pipe = self.r.pipeline(transaction=False)
            push_reports(pipe, self.worker_id, out, base=self.reports_base)  # first in the pipe (answers[0])
            # About once a second, the session's look at the control queue rides along (_control_waiting).
            look = time.monotonic() - self._control_asked > self.session_s / 2
            at = len(pipe)
            if look:
                self._control_asked = time.monotonic()
                inbox.look_at_control(pipe, control_queue(self.worker_id), self.worker_id)
            try:
                if rest:
                    answers = inbox.deliver(pipe, rest, dispatch=self.dispatch)
                    self.metrics.handovers.labels("redis").inc(len(rest))  # after: off the step's path
                else:
                    answers = pipe.execute(raise_on_error=False) if len(pipe) else []
            except Exception:
                self._return_commits(carried)  # sent again with the next hand-over or flush
                raise
            if out and isinstance(answers[0], Exception):
                log.warning("worker %s: reports not written (sent again): %s", self.worker_id, answers[0])
                self._return_commits(carried)
            if look:
                self._control_seen = (time.monotonic(), inbox.control_found(answers[at]))

        # With no hand-over for Redis (all went directly), it gets only reports: off the next step's path, so
        # they may go on the outbox's thread even with nothing else to run meanwhile.
        self.trace.mark("sending")
        try:
            self.outbox.submit(send, overlap=self._more_to_run or not rest)
            self.trace.mark("sent")
        except BaseException:
            if not started:  # never ran nor queued: the next hand-over must send the reports
                self._reports_queued = False
                sent_to_redis()
            raise

    def _send_direct(self, bundles: dict[str, bytes], nexts: list[StepPayload]) -> set[str]:
        """Send the bundles whose next worker has a direct-path address in the core's grant straight there,
        now, on this thread (not behind the outbox's Redis round trips: between distant hosts each is a whole
        round trip, and many micro-batches would queue behind them). Returns the workers they reached."""
        if self.connections is None or not bundles:
            return set()
        routes: dict[str, tuple[str, str]] = {}
        with self._commits_lock:
            behind = set(self._queued_for_redis)  # hand-overs to them still wait for Redis: keep the order
        for s in nexts:
            worker_id = s.here.worker_id
            url = s.g.direct_of(s.hop)
            if url and worker_id not in routes and worker_id != self.worker_id and worker_id not in behind:
                routes[worker_id] = (url, s.g.public_keys[s.hop])
        sent = {w for w, route in routes.items() if self.connections.send(w, *route, bundles[w])}
        if sent:
            self.metrics.handovers.labels("direct").inc(len(sent))
        return sent

    def _send_on(self, ran: list[_Ran]) -> None:
        nexts: list[StepPayload] = []
        for r in ran:
            if r.replay:
                nexts += r.out
                continue
            nxt = replace(r.step, hop=r.step.hop + 1, x=pack_tensor(r.out))
            state = self.jobs[r.step.job_id]
            sent = state.last_out.get(r.step.hop)
            if sent is not None and sent[0] == r.step.step and isinstance(sent[1], list) \
                    and r.step.pos > sent[1][-1].pos:
                sent[1].append(nxt)  # the next part of the step's prompt (one from its start again: anew)
            else:
                state.last_out[r.step.hop] = (r.step.step, [nxt])
            nexts.append(nxt)
        self._hand_over_parts(nexts)
        # Commitments after the hand-over: off the step's critical path (the next hop is already working).
        self._send_commits([(r.step, r.out) for r in ran if not r.replay])

    def _send_commits(self, outputs: list[tuple[StepPayload, torch.Tensor]]) -> None:
        """Commit to ``outputs``; the reports go with the next hand-over (or ``_flush_commits``), not in a
        round trip of their own: between hosts that round trip would delay this worker's next wait on its
        inbox, and with it the job's next step (bench/latency.py)."""
        made = [c for step, rows in outputs for c in self._commit(step, rows)]
        if made:
            with self._commits_lock:
                self._unsent_commits += made

    def _take_unsent_commits(self) -> tuple[list[bytes], list[bytes]]:
        """The reports not sent yet: (token reports, commitments). They go in that order (the collector
        handles reports as they come, and a token behind a few commitments reaches the user later)."""
        with self._commits_lock:
            out = self._unsent_tokens, self._unsent_commits
            self._unsent_tokens, self._unsent_commits = [], []
        return out

    def _return_commits(self, carried: tuple[list[bytes], list[bytes]]) -> None:
        """Reports whose send failed go first in the next one, each kind in its order (the collector keeps
        the first copy of a commitment chunk and publishes a step once, so one that did arrive after all is
        harmless): a lost chunk would make the verifier find a live, honest worker that did not commit."""
        tokens, commits = carried
        with self._commits_lock:
            self._unsent_tokens = [*tokens, *self._unsent_tokens]
            self._unsent_commits = [*commits, *self._unsent_commits]

    def _flush_commits(self, final: list[bytes] | None = None) -> None:
        """Push the commitments not sent yet (then ``final``), after every hand-over submitted (they may
        carry earlier chunks), before this worker stops taking steps. A failed earlier hand-over is logged,
        not raised: its steps are the watchdog's to recover, and these commitments must still go out."""
        try:
            self.outbox.drain()
        except Exception as exc:
            log.warning("worker %s: an earlier hand-over failed: %s", self.worker_id, exc)
        tokens, commits = self._take_unsent_commits()
        out = [*tokens, *commits, *(final or [])]
        if out:
            try:
                push_reports(self.r, self.worker_id, out, base=self.reports_base)
            except Exception:
                self._return_commits((tokens, [*commits, *(final or [])]))  # the next send takes them
                raise

    def _finish_steps(self, ran: list[_Ran]) -> None:
        """Last stage: sample, tell the core each token (a signed report), and send the next step to hop 0
        unless the job ended here (stop ids, stop strings, max_tokens): one Redis round trip.

        A replayed step is reported again (the core publishes each step once) but not sent on: its successor
        was sent when it first ran, and sending it again would replay the whole route."""
        from azu.engine.sampling import SamplingParams, sample

        if not ran:
            return
        reports: list[bytes] = []
        nexts: list[StepPayload] = []
        logits: list[tuple[StepPayload, torch.Tensor]] = []  # committed to after the hand-over
        ended: list[tuple[str, int]] = []
        for r in ran:
            s = r.step
            g = s.sampling
            if r.replay:
                token = int(r.out)
            else:
                params = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
                token = int(sample(r.out, params, seed=g.seed, step=s.step))
                self.jobs[s.job_id].last_out[s.hop] = (s.step, token)
                logits.append((s, r.out.reshape(1, -1)))
            reports.append(self.signed_report("token", {"job_id": s.job_id, "epoch": s.g.epoch,
                                                        "step": s.step, "token": token}))
            if r.replay:
                continue
            done = (token in g.stop_ids or s.step + 1 >= g.max_tokens
                    or (bool(g.stop) and self._hits_stop(s, token)))
            if done:
                ended.append((s.job_id, s.g.epoch))
                continue
            nexts.append(replace(s, step=s.step + 1, hop=0, pos=g.prompt_len + s.step, x=[token]))
        self._hand_over_parts(nexts, reports=reports)
        self._send_commits(logits)
        for job_id, epoch in ended:  # after the commitments: the end sends the last (final) chunk
            self._end_local(job_id, epoch)

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

    def _end_local(self, job_id: str, epoch: int) -> bool:
        """End the job here at ``epoch``: its final commitments queued, its caches dropped. False if there
        was nothing to end (an order for a route the job has left, or one already carried out: a replayed
        order costs nothing)."""
        state = self.jobs.get(job_id)
        if state is not None and state.epoch > epoch:
            return False  # an order for a route the job has left: its new epoch's caches stay
        if state is None and self.ended.get(job_id, -1) >= epoch:
            return False
        if state is not None and state.epoch == epoch and state.commits:
            # The final chunk goes with the next hand-over, or the flush when this worker stops taking steps
            # (a round trip of its own here would hold up every other job this worker is running).
            final = self._commit_reports(job_id, state, final=True)
            with self._commits_lock:
                self._unsent_commits += final
        self._drop_caches(job_id)
        self.ended[job_id] = max(epoch, self.ended.get(job_id, -1))
        self.ended.move_to_end(job_id)
        while len(self.ended) > _ENDED_MEMORY:
            self.ended.popitem(last=False)
        return True

    def _core_order(self, kind: str, job_id: str, epoch: int, sig: bytes) -> bool:
        """Whether an order about (``job_id``, ``epoch``) carries the core's signature; a malformed or
        unsigned one is refused (reported, counted) and must not be acted on. ``kind`` is ``"end"`` or
        ``"evidence"``."""
        domain, part = {"end": (auth.END_ORDER, end_order_part),
                        "evidence": (auth.EVIDENCE_ORDER, evidence_order_part)}[kind]
        try:
            if not isinstance(job_id, str) or not isinstance(epoch, int):
                raise InvalidRequest(f"malformed {kind} order")
            auth.check(self.core_key, domain, part(job_id, epoch), sig, what=f"{kind} order for {job_id}")
        except AzuError as exc:
            self._refuse(exc.message, why=f"{kind}_order_{exc.code}")
            return False
        return True

    def end_job(self, *, job_id: str, epoch: int, sig: bytes) -> None:
        """An end order on the control queue (a Celery message, as a core of the round before sent them):
        free the job's caches if the core signed the order, and send its final commitments now. The core
        now puts end orders in the inbox (``_process`` carries them out between rounds)."""
        if not self._core_order("end", job_id, epoch, sig):
            return
        with self.lock:
            if self._end_local(job_id, epoch):
                self._flush_commits()

    # --- verification ----------------------------------------------------------------------------
    def _commit(self, step: StepPayload, rows: torch.Tensor) -> list[bytes]:
        """Commit to what this step produced (before anyone can know whether the job will be checked);
        the signed reports of the chunks now full."""
        state = self.jobs.get(step.job_id)
        if state is None:
            return []
        state.commits.setdefault(step.hop, CommitBuffer()).add(rows)
        return self._commit_reports(step.job_id, state, final=False)

    def _commit_reports(self, job_id: str, state: _JobState, *, final: bool) -> list[bytes]:
        out = []
        for hop, buf in state.commits.items():
            chunks = buf.take(final=final)
            for n, (first, c) in enumerate(chunks):
                last = final and n == len(chunks) - 1
                out.append(self.signed_report("commit", {
                    "job_id": job_id, "epoch": state.epoch, "hop": hop, "first": first, "data": c.pack(),
                    "final": last}))
        return out

    def send_evidence(self, *, job_id: str, epoch: int, sig: bytes) -> None:
        """An evidence order (the core signed it): send the signed bundles this worker kept for the job."""
        if not self._core_order("evidence", job_id, epoch, sig):
            return
        with self.lock:
            bundles = self.evidence.take(job_id, epoch)
        self.report("evidence", {"job_id": job_id, "epoch": epoch, "bundles": bundles})

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
            # Not the jobs the running session holds: a long prompt's chunks, or one awaiting its next part.
            held = self._held
            idle = [j for j, s in self.jobs.items()
                    if now - s.touched > self.kv_idle_s and not (held is not None and held.has_job(j))]
            for job_id in idle:
                self._drop_caches(job_id)
        finally:
            self.lock.release()
        return idle

    def job_length(self, job_id: str) -> dict[str, int]:
        """Positions each held stage has cached for ``job_id`` (diagnostics and tests)."""
        with self.lock:
            return {f"{m} {span}": s.job_length(job_id) for (m, span), s in self.stages.items()}


def _listen_on(p2p_url: str) -> str:
    """Where to listen for a P2P address with no ``AZU_P2P_LISTEN``: every interface, the address's port."""
    return f"0.0.0.0:{direct.parse_address(p2p_url)[1]}"


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


def torch_input(x: list[int] | bytes) -> torch.Tensor:
    """A payload's input as a tensor: token ids (hop 0), or a hidden state (safetensors bytes)."""
    import torch

    return torch.tensor(x, dtype=torch.long) if isinstance(x, list) else unpack_tensor(x)
