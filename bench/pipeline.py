"""Pipeline benchmark: real Celery worker processes over Redis vs one process running ``generate``.

    python bench/pipeline.py [--quick] [--redis-db 10] [--json out.json]

One run, one table:
- P1  Qwen2.5-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864,
      vocab 151936, fp32), two worker processes (cut where placement cuts it, even work per stage, or
      12 layers each with ``--split layers``): decode tokens/s vs single-process ``generate`` (greedy),
      and time to first token.
- P2  per-hop overhead (broker + serialization + bookkeeping), p50 / p99: a 2-layer hidden-64 model on two
      workers; each step is 2 hops (A -> B, then B -> A with the sampled token). Overhead per hop =
      (client-observed time between tokens - the same stages' compute time in one process) / 2. Also the
      CPU time per step of each process on the way (workers, collector, Redis, the client): on a machine
      shared with other work it varies far less than the step's time, so it shows what a change saves.
      With ``--trace``, where a step's time goes: the workers note each point a step passes
      (azu.network.steptrace) and a second table gives the median of each leg, worker to worker.
- P3  aggregate tokens/s with 1, 4, 16 and 64 concurrent streams (micro-batches of decode steps, so both
      workers are busy at once, and prompts chunked between them: azu.network.batching), median time to
      first token. With ``--ttfts``, every stream's time to first token too (sorted, the run whose median
      counted): prompts that ran in one chunk get their first tokens together, so the median shows which
      chunk the middle stream's prompt rode in.
- Petals comparison: random Llama hidden 512 x 8 layers, vocab 32000, fp32, two workers: decode tokens/s
      and TTFT vs single process (Petals 2.2 measured 0.55x and 2.1x here).

P1 and the Petals row also run the same two stages in two bare processes joined by a pipe
(bench/_pipe_pair.py): the pipeline's ratio to that pair is what azu's messaging costs; the pair's own
ratio to one process is what taking turns costs on this machine.

Every process uses one thread (OMP_NUM_THREADS=1), the single-process baseline too: the machine has two
cores shared with other work, so numbers are noisy. P3 takes the best of ``--repeat`` runs; the b=1 rows (P1,
Petals' model) run their sides in turn for ``--rounds`` rounds and report the median of the rounds' ratios
(``Bench.ratio_row``).

On a GPU: ``python bench/pipeline.py --device cuda`` (bfloat16 unless ``--dtype``): the two workers share the
device, the baseline runs ``generate`` on it, and every timing waits for the device (the CPU kernel choice and
its "same kernels" baseline do not apply).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _support import QWEN, REPO, pythonpath, stream_prompts, synchronize, wait_until

sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PETALS = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
              intermediate_size=1376, vocab_size=32000, max_position_embeddings=2048)
# Llama-2-7B's shape (the GPU row; `--only-llama7b`): built on the run's device, in its dtype.
LLAMA7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
PROMPT = [1, *range(10, 25)]  # 16 tokens: the b=1 rows' prompt
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=320, max_position_embeddings=4096)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="azu-bench-"))
        self.registry = self.tmp / "registry"
        self.redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
        os.environ.update(REDIS_URL=self.redis_url, AZU_REGISTRY_DIR=str(self.registry),
                          AUTH_SECRET_KEY=os.environ.get("AUTH_SECRET_KEY") or secrets.token_hex(32))
        import redis

        self.r = redis.Redis.from_url(self.redis_url)
        self.r.flushdb()
        from tests.support.network import serve_registry

        self.server = serve_registry()
        self.registry_url = self.server.url
        self.procs: list[subprocess.Popen[bytes]] = []
        from azu.network.dispatch import get_dispatcher

        self.dispatch = get_dispatcher()
        # The core's report collector (publishes tokens, keeps the directory) as its own process, as in a
        # deployment: in this process its work would share the GIL with the client that takes the timings.
        log = open(self.tmp / "collector.log", "wb")  # noqa: SIM115 - lives as long as the process
        env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "azu.cli.processes", "collector"], cwd=REPO,
                                           env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        self.pids = {"collector": self.procs[-1].pid}  # whose CPU time the P2 row counts, by role
        self.rows: list[dict[str, Any]] = []
        self.plans: dict[int, str] = {}  # the CPU linears plan the same-kernels baseline ran, per model width
        self.cuts: dict[str, int] = {}  # model id -> the layer where its second worker's span starts
        self.hop_legs: list[Any] = []  # with --trace: the legs of a P2 step (azu.network.steptrace)
        self.ttft_lists: list[tuple[str, list[float]]] = []  # with --ttfts: P3's streams' TTFTs, sorted

    # -- setup ------------------------------------------------------------------------------------------
    def model(self, name: str, family: str, config: dict[str, Any], *, big: bool = False) -> tuple[str, Path]:
        """Build, shard and register a random model; ``big``: drawn on the run's device in its dtype (a 7B
        shape in float32 on the CPU would take minutes and 27 GB)."""
        from azu.cli import demo
        from azu.registry import status as models
        from azu.registry.sharder import shard_model

        built = dict(device=self.args.device, dtype=self.args.dtype) if big else {}
        src = demo.build_model(family, self.tmp / f"src-{name}", seed=1, **built, **config)
        shard_model(str(src), models.shard_dir(name), progress=False)
        models.mark_ready(self.r, name, source=str(src))
        return name, src

    def start_workers(self, ids: list[str]) -> None:
        from azu.network import auth, directory, keys

        for wid in ids:
            key_file = self.tmp / "keys" / f"{wid}.key"  # as enrollment would: the key, then its identity
            self.r.set(keys.identity(wid), auth.public_hex(auth.load_worker_key(key_file)))
            env = dict(os.environ, AZU_WORKER_ID=wid, AZU_WORKER_KEY_FILE=str(key_file),
                       AZU_CORE_PUBLIC_KEY=auth.core_public_key(), REGISTRY_URL=self.registry_url,
                       OMP_NUM_THREADS="1",
                       AZU_CACHE_DIR=str(self.registry), AZU_DEVICE=self.args.device,
                       AZU_DTYPE=self.args.dtype,
                       AZU_CPU_KERNELS=self.args.kernels, AZU_DECODE_GRAPHS=self.args.graphs,
                       PYTHONPATH=pythonpath(), AZU_HEARTBEAT_S="1")
            if self.args.trace:
                env["AZU_STEP_TRACE"] = str(self.tmp / "trace")
            if self.args.direct:  # hand-overs worker to worker over TCP (azu.network.direct), not Redis
                from azu.cli.up import free_port

                env["P2P_PUBLIC_URL"] = f"tcp://127.0.0.1:{free_port()}"
            env.pop("AUTH_SECRET_KEY")  # a worker holds the core's public key only
            log = open(self.tmp / f"{wid}.log", "wb")  # noqa: SIM115 - lives as long as the process
            level = "INFO" if self.args.worker_logs else "WARNING"
            argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", f"gpu.{wid},ctl.{wid}",
                    "--pool", "solo", "-n", f"{wid}@bench", "--loglevel", level, "--without-gossip",
                    "--without-mingle", "--without-heartbeat"]
            nice = functools.partial(os.nice, self.args.workers_nice) if self.args.workers_nice else None
            self.procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=nice))
            self.pids[f"worker {wid}"] = self.procs[-1].pid
        wait_until(lambda: set(ids) <= {w.worker_id for w in directory.live_workers(self.r)}, 120, "workers")

    def load_split(self, model_id: str, workers: list[str]) -> str:
        """Load ``model_id`` cut over ``workers`` the way placement cuts it (``--split work``: spans of even
        work, the head counted; ``--split layers``: equal layer counts); the cut, as text for the table."""
        from azu.engine.local import split_layers
        from azu.network import jobs, placement

        shape = jobs.model_info(self.r, model_id).shape
        spans = (placement.even_spans(shape, len(workers)) if self.args.split == "work"
                 else split_layers(shape.num_layers, len(workers)))
        self.load(model_id, {w: (s.first, s.last) for w, s in zip(workers, spans, strict=True)},
                  shape.num_layers)
        return " + ".join(f"{s.last - s.first}" for s in spans) + " layers"

    def load(self, model_id: str, layout: dict[str, tuple[int, int]], num_layers: int) -> None:
        from azu.engine.span import Span
        from azu.network import directory
        from azu.network.jobs import order_load

        spans = {wid: Span(a, b, a == 0, b == num_layers) for wid, (a, b) in layout.items()}
        if len(spans) == 2:
            self.cuts[model_id] = next(s.last for s in spans.values() if s.first == 0)
        for wid, span in spans.items():
            order_load(self.r, wid, model_id, span, dispatch=self.dispatch)

        def held() -> bool:
            from azu.network import keys

            for wid in spans:  # a failed load says so at once, not after the deadline
                reason = self.r.hget(keys.worker_errors(wid), model_id)
                if reason:
                    raise SystemExit(f"{wid} could not load {model_id}: {reason.decode()}")
            live = {w.worker_id: w for w in directory.live_workers(self.r)}
            return all(span in live[wid].holds(model_id) for wid, span in spans.items() if wid in live)

        wait_until(held, 600, f"{model_id} to load")

    def stop(self) -> None:
        if self.args.worker_logs:  # what the workers said of graphs and failures, before the logs go
            for path in sorted(self.tmp.glob("?.log")):
                said = [line for line in path.read_text(errors="replace").splitlines()
                        if re.search(r"graph|CPU linears|Error|Traceback|failed|WARNING", line)]
                print(f"--- {path.name}: {len(said)} lines\n" + "\n".join(said[-40:]), file=sys.stderr)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.server.shutdown()
        self.r.flushdb()
        shutil.rmtree(self.tmp, ignore_errors=True)  # models of several GB

    # -- measuring ------------------------------------------------------------------------------------------
    def run_jobs(self, model_id: str, prompts: list[list[int]], n: int) -> list[dict[str, Any]]:
        """Submit all jobs at once; per job: arrival time of every token (client side), submit time."""
        from azu.network import jobs, keys

        t0 = time.perf_counter()
        ids = []
        for p in prompts:
            job_id = f"b-{uuid.uuid4().hex[:12]}"
            jobs.submit_job(self.r, jobs.JobRequest(job_id=job_id, user_id="bench", model_id=model_id,
                                                    prompt_ids=p, max_tokens=n, stop_token_ids=[]),
                            dispatch=self.dispatch)
            ids.append(job_id)
        last = dict.fromkeys(ids, "0-0")
        arrivals: dict[str, list[float]] = {j: [] for j in ids}
        open_ids = set(ids)
        while open_ids:
            streams = {keys.events(j): last[j] for j in open_ids}
            for stream, entries in self.r.xread(streams, block=1000) or []:
                job_id = stream.decode().split(":")[2]
                now = time.perf_counter()
                for entry_id, fields in entries:
                    last[job_id] = entry_id.decode()
                    kind = fields.get(b"k")
                    if fields.get(b"t"):
                        arrivals[job_id].append(now)
                    if kind in (b"done", b"error"):
                        if kind == b"error":
                            raise SystemExit(f"job failed: {fields}")
                        open_ids.discard(job_id)
        return [{"submit": t0, "arrivals": arrivals[j]} for j in ids]

    def generate_side(self, src: Path, prompt: list[int], n: int, *,
                      azu_kernels: bool = False) -> Callable[[], tuple[float, float]]:
        """transformers' generate in this process (1 thread), loaded and warmed up now: a call answers
        ``prompt`` once, (TTFT s, decode tokens/s). ``azu_kernels``: with the linears on the kernels azu's
        stages use on a CPU (azu.engine.kernels), so the ratio shows what the pipeline itself costs."""
        import torch
        from transformers import AutoModelForCausalLM

        from azu.engine import kernels

        torch.set_num_threads(1)
        device, dtype = self.args.device, getattr(torch, self.args.dtype)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device).eval()
        if azu_kernels:
            head = model.get_output_embeddings()
            if head is not None and head.weight is model.get_input_embeddings().weight:
                # Untied, as on azu's last stage (which holds no embeddings): packed there if the plan packs.
                head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            # Measured as a worker measures, on this process's working set: the whole model's weights.
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            shapes = kernels.stage_shapes(
                kernels.layer_shapes(model.config.to_dict(), model.config.hidden_size),
                model.config.num_hidden_layers, (model.config.vocab_size, model.config.hidden_size))
            plan = kernels.measured_plan(self.args.kernels, shapes, weight_bytes)
            self.plans[model.config.hidden_size] = plan.describe()
            kernels.apply_plan(model, plan, release=lambda _rows: None)
        ids = torch.tensor([prompt], device=device)
        mask = torch.ones_like(ids)

        def gen(k: int) -> float:
            synchronize(device)
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False)
            synchronize(device)
            return time.perf_counter() - t

        def once() -> tuple[float, float]:
            ttft = gen(1)
            return ttft, (n - 1) / (gen(n) - ttft)

        gen(2)  # warm-up
        return once

    def pipeline_once(self, model_id: str, prompt: list[int], n: int) -> tuple[float, float]:
        """One answer of ``n`` tokens through the workers: (TTFT s, decode tokens/s)."""
        (res,) = self.run_jobs(model_id, [prompt], n)
        a = res["arrivals"]
        return a[0] - res["submit"], (len(a) - 1) / (a[-1] - a[0])

    # -- the rows --------------------------------------------------------------------------------------
    def ratio_row(self, label: str, model_id: str, src: Path, prompt: list[int], n: int,
                  target: str) -> None:
        """The pipeline at b=1 against one process running ``generate`` (on a CPU also with azu's kernels;
        where the model is cut in two, also the same two stages as bare processes over a pipe).

        The sides take turns: ``--rounds`` rounds, each side answering once per round, the order rotating
        from round to round. A ratio is the median over the rounds of the two sides' ratio within a round:
        this machine's speed drifts by 10-20% over minutes (a 2-core virtual machine), and sides measured
        one after the other, each over several answers, carried the drift into their ratio (Petals' model
        at 0.71x to 0.91x `generate` in runs of the same hour). The absolute figures are each side's best."""
        sides: dict[str, Callable[[], tuple[float, float]]] = {
            "pipeline": functools.partial(self.pipeline_once, model_id, prompt, n),
            "generate": self.generate_side(src, prompt, n)}
        if self.args.kernels != "torch" and self.args.device == "cpu" and self.args.dtype == "float32":
            # The same kernels in one process: what is left is the pipeline's own cost.
            sides["with azu's CPU linears"] = self.generate_side(src, prompt, n, azu_kernels=True)
        pair = None
        if model_id in self.cuts:
            # The same two stages in two bare processes, a pipe between them: what taking turns costs on this
            # machine without any of azu's messaging (bench/_pipe_pair.py).
            from _pipe_pair import PipePair

            from azu.registry import status as models

            pair = PipePair(models.shard_dir(model_id), self.cuts[model_id], n, device=self.args.device,
                            dtype=self.args.dtype, rounds=self.args.rounds + 1, kernels=self.args.kernels)
            sides["two bare processes over a pipe"] = functools.partial(pair.round, prompt)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        try:
            self.run_jobs(model_id, [prompt], 2)  # warm-up (a generate side warms up as it loads)
            if pair is not None:
                pair.round(prompt)
            names = list(sides)
            for i in range(self.args.rounds):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    runs[name].append(sides[name]())
        finally:
            if pair is not None:
                pair.close()

        def best(name: str) -> str:
            return (f"{max(rate for _, rate in runs[name]):.2f} tok/s, "
                    f"TTFT {min(ttft for ttft, _ in runs[name]) * 1000:.0f} ms")

        def ratios(name: str) -> str:
            rounds = list(zip(runs["pipeline"], runs[name], strict=True))
            decode = [p_rate / s_rate for (_, p_rate), (_, s_rate) in rounds]
            ttft = statistics.median(p_ttft / s_ttft for (p_ttft, _), (s_ttft, _) in rounds)
            spread = f" ({min(decode):.2f}-{max(decode):.2f})" if len(decode) > 1 else ""
            return f"decode {statistics.median(decode):.2f}x{spread}, TTFT {ttft:.2f}x"

        baselines = [name for name in sides if name != "pipeline"]
        result = "; ".join(f"vs {name}: {ratios(name)}" for name in baselines)
        self.add_row({"row": label, "pipeline": best("pipeline"),
                      "single process": "; ".join(f"{name} {best(name)}" for name in baselines),
                      "result": f"{result} (medians of {self.args.rounds} interleaved rounds)",
                      "target": target})

    def hop_row(self, model_id: str, src: Path, steps: int) -> None:
        import torch

        from azu.engine.sampling import SamplingParams, sample
        from azu.engine.span import Span
        from azu.engine.stage import Stage
        from azu.registry import status as models

        torch.set_num_threads(1)
        folder = models.shard_dir(model_id)
        device, dtype = self.args.device, self.args.dtype
        a = Stage.load(folder, Span(0, 1, embeddings=True), device=device, dtype=dtype)
        b = Stage.load(folder, Span(1, 2, head=True), device=device, dtype=dtype)
        prompt = [1, 5, 9, 13]
        times = []
        token = 0
        for step in range(steps + 1):
            x = torch.tensor(prompt if step == 0 else [token], device=device)
            t = time.perf_counter()
            # sample() reads the logits on the host: the step's time includes waiting for the device.
            token = sample(b.forward("c", a.forward("c", x)), SamplingParams(), seed=0, step=step)
            times.append(time.perf_counter() - t)
        compute = statistics.median(times[1:])
        self.run_jobs(model_id, [prompt], 4)
        cpu_before = self.cpu_seconds()
        since = time.monotonic_ns()
        (res,) = self.run_jobs(model_id, [prompt], steps + 1)
        until = time.monotonic_ns()
        cpu = {who: (s - cpu_before[who]) / steps * 1000 for who, s in self.cpu_seconds().items()}
        if self.args.trace:
            self.hop_legs = self.traced_legs(since, until)
        arr = res["arrivals"]
        gaps = sorted(b2 - b1 for b1, b2 in itertools.pairwise(arr))
        per_hop = [(g - compute) / 2 for g in gaps]
        p50 = statistics.median(per_hop)
        p99 = per_hop[min(len(per_hop) - 1, int(0.99 * len(per_hop)))]
        self.add_row({"row": "P2 per-hop overhead (2 workers, hidden 64 x 2 layers)",
                          "pipeline": f"step {statistics.median(gaps) * 1000:.2f} ms (p50), 2 hops; CPU per "
                                      "step: " + ", ".join(f"{who} {ms:.2f} ms" for who, ms in cpu.items()),
                          "single process": f"compute {compute * 1000:.2f} ms/step",
                          "result": f"p50 {p50 * 1000:.2f} ms/hop, p99 {p99 * 1000:.2f} ms/hop",
                          "target": "p50 <= 1 ms/hop"})

    def traced_legs(self, since: int, until: int) -> list[Any]:
        """The legs of a step through the two workers between the two monotonic times, from their step
        traces (``--trace``): each worker writes its marks as its session turns idle, just after the job."""
        from azu.network import steptrace

        folder = self.tmp / "trace"
        marks: list[steptrace.Mark] = []
        counts: list[int] = []

        def settled() -> bool:  # both workers' marks of this job written, and no more coming
            marks[:] = steptrace.read(folder, since_ns=since, until_ns=until)
            counts.append(len(marks))
            # Marks of this job's window from both, not only their files: in a full run the files already
            # hold P1's marks, and an empty window read three times would pass for settled.
            both = {m.worker for m in marks} >= {"a", "b"}
            return both and len(counts) > 2 and counts[-1] == counts[-3]

        wait_until(settled, 30, "the workers' step traces", interval=0.25)
        return steptrace.step_path(marks, "a taken")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of each process a step passes through: the workers, the core's
        collector, Redis (when it runs on this machine) and this process (the client reading the events).
        On two shared cores it is what the steps compete for, and it varies far less than a step's time."""
        import psutil

        pids = dict(self.pids)
        with contextlib.suppress(Exception):
            pids["Redis"] = int(self.r.info("server")["process_id"])
        pids["client"] = os.getpid()
        out = {}
        for who, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if who == "Redis" and "redis" not in proc.name():
                    continue  # not this machine's Redis (a server elsewhere, or in a container)
                times = proc.cpu_times()
                out[who] = times.user + times.system
        return out

    def streams_row(self, label: str, model_id: str, n: int, counts: list[int], target: int, *,
                    bound: bool = False) -> None:
        """Aggregate tokens/s (all tokens / time from submit to the last token) and median TTFT for each
        number of concurrent streams in ``counts`` (the first is the one the others are compared with);
        ``bound``: also what the machine allows ``target`` streams (bench/_stream_bound.py; on a CPU)."""
        every_ttft: dict[int, list[float]] = {}

        def agg(k: int) -> tuple[float, float]:
            prompts = stream_prompts(k)
            best_rate, best_ttft = 0.0, float("inf")
            for _ in range(self.args.repeat):
                res = self.run_jobs(model_id, prompts, n)
                end = max(r["arrivals"][-1] for r in res)
                total = sum(len(r["arrivals"]) for r in res)
                best_rate = max(best_rate, total / (end - res[0]["submit"]))
                ttfts = sorted(r["arrivals"][0] - r["submit"] for r in res)
                median = statistics.median(ttfts)
                if median < best_ttft:
                    best_ttft, every_ttft[k] = median, ttfts
            return best_rate, best_ttft

        measured = [(k, *agg(k)) for k in counts]
        if self.args.ttfts:
            for k in counts:
                if 1 < k <= 16:  # 64 figures would not read as a cell
                    print(f"[bench] {label}, {k} streams, every TTFT (s, sorted): "
                          f"{' '.join(f'{t:.2f}' for t in every_ttft[k])}", file=sys.stderr, flush=True)
                    self.ttft_lists.append((f"{label}, {k} streams", every_ttft[k]))
        one = measured[0][1]
        parts = [f"{k}: {rate:.1f} tok/s, TTFT {ttft * 1000:.0f} ms" for k, rate, ttft in measured]
        allows, shares = "-", {}
        cpu = self.args.device == "cpu"
        if bound and cpu and counts[0] == 1 and target in counts and model_id in self.cuts:
            # What this CPU allows that many streams, on the same stages without messaging or prompts.
            import _stream_bound

            from azu.registry import status as models
            from azu.registry.manifest import Manifest

            folder = models.shard_dir(model_id)
            got = _stream_bound.measure(folder, self.cuts[model_id], Manifest.load(folder).num_layers,
                                        stream_prompts(target), kernels=self.args.kernels)
            allows = got.describe()
            rate = next(rate for k, rate, _ in measured if k == target)
            shares[target] = f" ({rate / one / got.ratio:.0%} of the bound)"
        ratios = ", ".join(f"{k}: {rate / one:.2f}x{shares.get(k, '')}" for k, rate, _ in measured[1:])
        self.add_row({"row": label, "pipeline": "; ".join(parts), "single process": allows,
                          "result": ratios,
                          "target": f"{target} streams >= 8x one, median TTFT <= 1.5 s"})

    def add_row(self, row: dict[str, Any]) -> None:
        """A row of the table, also printed now (to stderr): a run cut short still shows what it measured."""
        self.rows.append(row)
        print(" | ".join(str(v) for v in row.values()), file=sys.stderr, flush=True)

    def table(self) -> str:
        cols = ["row", "pipeline", "single process", "result", "target"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols}
        lines = ["| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |",
                 "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"]
        lines += ["| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |" for r in self.rows]
        return "\n".join(lines)


def main() -> int:
    from azu.config import CPU_KERNELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-db", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="skip the Qwen-shaped model (P1 and P3 on it)")
    p.add_argument("--repeat", type=int, default=2, help="runs of P3 (the best counts)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of the b=1 rows (P1, Petals' model, the 7B shape): medians")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per job for P1/P3 on the Qwen shape")
    p.add_argument("--streams", default="1,4,16,64", help="concurrent streams for P3 (first: the baseline)")
    p.add_argument("--split", choices=("work", "layers"), default="work",
                   help="how the models are cut over the two workers: spans of even work, as placement cuts "
                        "them (default), or equal layer counts")
    p.add_argument("--kernels", choices=CPU_KERNELS, default="auto",
                   help="the workers' AZU_CPU_KERNELS (azu.engine.kernels)")
    p.add_argument("--device", default="cpu", help="the workers' and the baseline's device (cpu, cuda)")
    p.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda by default")
    p.add_argument("--only-llama7b", action="store_true",
                   help="only a Llama-2-7B-shaped model at b=1 (the GPU row; built on --device in --dtype)")
    p.add_argument("--llama7b-layers", type=int, default=LLAMA7B["num_hidden_layers"],
                   help="fewer layers of the 7B shape (a rehearsal on a CPU: bench/gpu.sh rehearse)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="the workers' AZU_DECODE_GRAPHS (azu.engine.graphs)")
    p.add_argument("--rows", default="p1,p2,p3,petals", help="which rows to run (p1, p2, p3, petals)")
    p.add_argument("--worker-logs", action="store_true",
                   help="workers log at INFO; their lines on kernels, graphs and failures printed at the end")
    p.add_argument("--trace", action="store_true",
                   help="workers note when each step passes each point of a hop (AZU_STEP_TRACE); the P2 row "
                        "prints where a step's time goes, leg by leg")
    p.add_argument("--direct", action="store_true",
                   help="workers hand over to each other over TCP (P2P_PUBLIC_URL on 127.0.0.1), not Redis")
    p.add_argument("--workers-nice", type=int, default=0,
                   help="the workers' niceness (negative: they go before the collector, Redis and this "
                        "process on the CPUs; needs root): what sharing the cores with the core costs")
    p.add_argument("--ttfts", action="store_true",
                   help="P3: every stream's time to first token (up to 16 streams), in a table of its own")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.llama7b_layers < 2:
        p.error("--llama7b-layers: at least 2 (one per worker)")
    bench = Bench(args)
    if args.only_llama7b:
        return llama7b_only(bench, args)
    try:
        tiny, tiny_src = bench.model("bench-tiny", "llama", TINY)
        petals, petals_src = bench.model("bench-petals", "llama", PETALS)
        qwen = qwen_src = None
        if not args.quick:
            qwen, qwen_src = bench.model("bench-qwen", "qwen2", QWEN)
        bench.start_workers(["a", "b"])
        bench.load(tiny, {"a": (0, 1), "b": (1, 2)}, 2)
        petals_at = bench.load_split(petals, ["a", "b"])
        qwen_at = bench.load_split(qwen, ["a", "b"]) if qwen else ""
        rows = set(args.rows.split(","))
        how = (", direct path" if args.direct else "") + (f", workers at nice {args.workers_nice}"
                                                          if args.workers_nice else "")
        if qwen and qwen_src and "p1" in rows:
            bench.ratio_row(f"P1 Qwen2.5-0.5B shape, 2 workers ({qwen_at}{how}) vs generate", qwen, qwen_src,
                            PROMPT, args.tokens, "decode >= 0.97x")
        if "p2" in rows:
            bench.hop_row(tiny, tiny_src, steps=1000)
        counts = [int(k) for k in args.streams.split(",")]
        if qwen and "p3" in rows:
            bench.streams_row(f"P3 Qwen2.5-0.5B shape, 2 workers ({qwen_at}{how})", qwen, args.tokens, counts,
                              16, bound=True)
        if "p3" in rows:
            bench.streams_row(f"P3 Llama 512x8, 2 workers ({petals_at}{how})", petals, 32, counts, 16)
        if "petals" in rows:
            bench.ratio_row(f"Petals model (Llama 512x8, vocab 32000, {args.dtype}; {petals_at}{how})",
                            petals, petals_src, PROMPT, 64, "decode >= 0.95x, TTFT <= 1.1x")
    finally:
        bench.stop()
    return report(bench, args)


def report(bench: Bench, args: argparse.Namespace) -> int:
    """Print the table (and the CPU kernel plans the baselines ran); write ``--json``."""
    print(bench.table())
    if bench.hop_legs:
        total = sum(leg.median_ms for leg in bench.hop_legs)
        print("\nWhere a P2 step's time goes (--trace; workers a and b, medians; a leg's time is what "
              "passed, whichever process ran meanwhile):\n")
        print("| from | to | ms (median) | share of the step | how often the next mark |")
        print("|---|---|---|---|---|")
        for leg in bench.hop_legs:
            print(f"| {leg.start} | {leg.end} | {leg.median_ms:.3f} | {leg.median_ms / total:.0%} | "
                  f"{leg.share:.0%} |")
        print(f"| | sum | {total:.2f} | | |")
    if bench.ttft_lists:
        print("\nEvery stream's time to first token (--ttfts; s, sorted, the run whose median counted):\n")
        print("| P3 row | TTFTs | median |\n|---|---|---|")
        for label, ttfts in bench.ttft_lists:
            print(f"| {label} | {' '.join(f'{t:.2f}' for t in ttfts)} | {statistics.median(ttfts):.2f} |")
    for hidden, plan in bench.plans.items():
        print(f"CPU linears of a model {hidden} wide (AZU_CPU_KERNELS={args.kernels}, as measured by the "
              f"baseline's process; each worker measures its own): {plan}")
    if args.json:
        Path(args.json).write_text(json.dumps(bench.rows, indent=2))
    return 0


def llama7b_only(bench: Bench, args: argparse.Namespace) -> int:
    """The issue's second GPU row: a Llama-2-7B shape through 2 worker processes at b=1 vs ``generate``."""
    layers = args.llama7b_layers
    try:
        config = dict(LLAMA7B, num_hidden_layers=layers)
        model_id, src = bench.model("bench-llama7b", "llama", config, big=True)
        bench.start_workers(["a", "b"])
        at = bench.load_split(model_id, ["a", "b"])
        shape = "Llama-2-7B shape" if layers == LLAMA7B["num_hidden_layers"] else f"7B shape, {layers} layers"
        bench.ratio_row(f"{shape}, {args.dtype}, 2 workers ({at}) vs generate", model_id, src,
                        PROMPT, args.tokens, ">= 100 tok/s on a GPU (generate: 13.7)")
    finally:
        bench.stop()
    return report(bench, args)


if __name__ == "__main__":
    sys.exit(main())
