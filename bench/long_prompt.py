"""Long prompts: time to first token of a 2048-token prompt through 2 and 3 worker processes vs one process,
and what each hand-over of the prompt's hidden states costs through Redis.

    python bench/long_prompt.py [--quick] [--prompt-tokens 2048] [--workers 2,3] [--repeat 2] [--json F]

One run, one table (ratios from the same run):
- the model: Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab
  151936; random weights, fp32, CPU), as bench/pipeline.py; ``--quick``: a small Qwen2 (hidden 256, 6 layers,
  vocab 32000) and a 256-token prompt.
- the prompt: random token ids (seeded), ``--max-tokens`` new tokens (greedy).
- azu: real Celery worker processes (tests/support/network.py's Cluster) on their own redis-server, the layers
  split evenly (azu.engine.local.split_layers), the core's report collector as its own process; TTFT is from
  ``jobs.submit_job`` to the first token event read from the job's stream (``jobs.read_events``).
- one process, in this process: (1) transformers ``generate`` with one new token, timed right before each
  azu job (the machine's load changes; this is what the issue's "TTFT <= 1.1x of one process" means, as
  bench/pipeline.py's P1); (2) the same stages (``azu.engine.stage.Stage``) chained by function calls, the
  prompt in one piece and in chunks of ``AZU_PREFILL_CHUNK`` positions as a worker runs it (the compute the
  workers do, one stage after the other), timed once before the workers start. Each worker hands every
  chunk on as it has run it, so the stages run at once and azu's TTFT can be under that sum.
- per hop: the prompt's hidden state goes on in parts of a lone prompt's chunk: their safetensors bytes, the
  bytes Redis received during one job, the time of one part's hand-over through Redis (``inbox.deliver`` +
  the taker's ``Inbox.wait``, the code path a worker uses, with a payload of that size on the same
  redis-server), and the cost around it that any path pays (pack, SHA-256 + Ed25519 over the bundle, check,
  unpack); each summed over the hops' parts as a share of azu's TTFT (as if none overlapped a forward). The
  issue's rule: if Redis costs more than 5% of TTFT, big payloads need a direct worker-to-worker path.
- the workers' own forward time during the job (their Prometheus ``azu_worker_step_duration_seconds_sum``),
  and that over TTFT: above 1, the stages ran at once.

Every process uses one thread (OMP_NUM_THREADS=1), the baselines too. Each TTFT is the best of ``--repeat``
jobs after a short warm-up job. All worker processes boot together; each layout's weights are loaded in its
turn and its workers stopped after it (``--quick``: all layouts load at once). The machine is small and
shared: numbers are noisy, and the table says the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from _support import QWEN, wait_until

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

SMALL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=768, vocab_size=32000, tie_word_embeddings=True, use_sliding_window=False,
             max_position_embeddings=4096)
REDIS_SHARE_LIMIT = 0.05  # the issue: above this share of TTFT, big payloads go worker to worker
HANDOVER_TRIALS = 15


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class NoDispatch:
    """A dispatcher that sends nothing: the Redis hand-over timed alone, without waking a worker."""

    def send_task(self, name: str, *, queue: str, args: Any = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        return


class LongPromptBench:
    def __init__(self, args: argparse.Namespace, base: Path, redis_url: str) -> None:
        import redis

        import workers
        from azu.network.dispatch import get_dispatcher
        from tests.support.network import Cluster, serve_registry

        self.args = args
        self.base = base
        self.r = redis.Redis.from_url(redis_url)
        self.r.flushdb()
        self.server = serve_registry()
        workers.use_broker(redis_url)
        self.dispatch = get_dispatcher()
        (base / "net").mkdir()
        self.cluster = Cluster(self.r, base / "net", self.server.url)
        self.collector: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.src = Path()
        self.counts: list[int] = []
        self.num_layers = 0
        self.hidden = 0
        self.hf: Any = None

    @staticmethod
    def model_id(n: int) -> str:
        """One model id per layout (the same weights): a job's route can only be the layout under test."""
        return f"bench-long-prompt-{n}"

    @staticmethod
    def worker_ids(n: int) -> list[str]:
        return [f"w{n}{chr(ord('a') + i)}" for i in range(n)]

    # -- setup ------------------------------------------------------------------------------------------
    def build(self, shape: dict[str, Any], counts: list[int]) -> None:
        from azu.cli import demo
        from azu.registry import status as models
        from azu.registry.sharder import shard_model

        t = time.perf_counter()
        self.src = demo.build_model("qwen2", self.base / "src", seed=1, **shape)
        for n in counts:
            shard_model(str(self.src), models.shard_dir(self.model_id(n)), progress=False)
            models.mark_ready(self.r, self.model_id(n), source=str(self.src))
        self.counts = counts
        self.num_layers = int(shape["num_hidden_layers"])
        self.hidden = int(shape["hidden_size"])
        print(f"model built and sharded in {time.perf_counter() - t:.1f} s", flush=True)

    def start_network(self, counts: list[int]) -> None:
        """The core's report collector, and every worker process of every layout at once (started together
        they boot in parallel; each layout's weights are loaded only when its turn comes, and its workers
        stopped after it: never two copies of the weights at once)."""
        from azu.cli.up import free_port

        # The collector (publishes tokens) as its own process, as bench/pipeline.py runs it: in this process
        # it would share the GIL with the client that takes the timings. No verifier runs (it would re-compute
        # each job in one prefill, on the same CPUs, while the next job is timed).
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        log = open(self.base / "collector.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.collector = subprocess.Popen([sys.executable, "-m", "azu.cli.processes", "collector"],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        t = time.perf_counter()
        ids = [wid for n in counts for wid in self.worker_ids(n)]
        for wid in ids:
            self.ports[wid] = free_port()
            self.cluster.start_gpu(wid, AZU_METRICS_PORT=str(self.ports[wid]))
        self.cluster.wait_live(*ids, timeout=300)
        print(f"{len(ids)} worker processes up in {time.perf_counter() - t:.1f} s", flush=True)

    def stop(self) -> None:
        self.cluster.stop_all()
        if self.collector is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.collector.pid, signal.SIGTERM)
            try:
                self.collector.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.collector.pid, signal.SIGKILL)
        self.server.shutdown()
        with contextlib.suppress(Exception):
            self.r.flushdb()

    # -- one process --------------------------------------------------------------------------------------
    def load_generate(self) -> None:
        """transformers' model of the same weights in this process, warmed up: the baseline each azu job is
        timed next to."""
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.hf = AutoModelForCausalLM.from_pretrained(self.src, dtype=torch.float32).eval()
        self.generate_ttft(list(range(3, 19)))

    def generate_ttft(self, ids: list[int]) -> float:
        """Seconds of ``generate`` with one new token (prefill + the first greedy token), 1 thread."""
        import torch

        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.no_grad():
            self.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1,
                             do_sample=False)
        return time.perf_counter() - t

    def baseline_stages(self, prompt: list[int], chunks: list[int]) -> list[float]:
        """The workers' compute in one process: the same ``Stage``s (2 of them; the split does not change the
        work) chained by function calls, the prompt in pieces of each of ``chunks`` positions (a worker runs
        AZU_PREFILL_CHUNK per turn), greedy first token; best of N for each."""
        import torch

        from azu.engine.local import split_layers
        from azu.engine.stage import Stage
        from azu.registry import status as models

        torch.set_num_threads(1)
        folder = models.shard_dir(self.model_id(self.counts[0]))
        stages = [Stage.load(folder, span) for span in split_layers(self.num_layers, 2)]

        def run(ids: list[int], chunk: int) -> float:
            job = f"local-{uuid.uuid4().hex[:8]}"
            t = time.perf_counter()
            x = torch.tensor(ids)
            for stage in stages:
                outs = [stage.forward(job, part) for part in x.split(chunk)]
                x = outs[-1] if stage.span.head else torch.cat(outs)
            int(torch.argmax(x))
            took = time.perf_counter() - t
            for stage in stages:
                stage.end_job(job)
            return took

        run(prompt[:16], 16)  # warm-up
        # The stages are freed with this frame.
        return [min(run(prompt, c) for _ in range(self.args.repeat)) for c in chunks]

    # -- the hand-over, alone -------------------------------------------------------------------------------
    def hidden_bytes(self, tokens: int) -> int:
        """Bytes of the hidden state a stage hands on for ``tokens`` positions (safetensors, as sent)."""
        import torch

        from azu.network.wire import pack_tensor

        return len(pack_tensor(torch.zeros(tokens, self.hidden, dtype=torch.float32)))

    def time_redis_handover(self, size: int) -> float:
        """Median seconds of one hand-over of ``size`` bytes through Redis, by the code a worker uses:
        ``inbox.deliver`` (RPUSH + EXPIRE + SET NX, one round trip) then the taker's ``Inbox.wait``."""
        from azu.network import inbox

        payload = os.urandom(size)
        taker = inbox.Inbox(self.r, "bench-handover")
        times = []
        for _ in range(HANDOVER_TRIALS + 1):
            t = time.perf_counter()
            inbox.deliver(self.r.pipeline(transaction=False), {"bench-handover": payload},
                          dispatch=NoDispatch())
            got = taker.wait(5.0)
            times.append(time.perf_counter() - t)
            assert len(got) == 1 and len(got[0]) == size
        taker.clear()
        return statistics.median(times[1:])

    def time_codec(self, tokens: int) -> float:
        """Median seconds of what a hand-over costs around the transport (any path pays it): pack the hidden
        state, sign the bundle (SHA-256 of the payloads, then Ed25519); on the other side check, unpack."""
        import torch
        from nacl.signing import SigningKey

        from azu.network import auth
        from azu.network.wire import StepBundle, pack_tensor, unpack_tensor

        key = SigningKey.generate()
        public = auth.public_hex(key)
        h = torch.randn(tokens, self.hidden, dtype=torch.float32)
        times = []
        for _ in range(HANDOVER_TRIALS + 1):
            t = time.perf_counter()
            bundle = StepBundle("a", (pack_tensor(h),))
            blob = StepBundle("a", bundle.steps, auth.sign(key, auth.STEPS, bundle.signed_part())).pack()
            got = StepBundle.unpack(blob)
            auth.check(public, auth.STEPS, got.signed_part(), got.sig, what="bench")
            unpack_tensor(got.steps[0])
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    # -- the network ----------------------------------------------------------------------------------------
    def _worker_compute(self, ids: list[str]) -> float:
        """Sum over the workers of their forward time so far (their own metrics endpoint)."""
        total = 0.0
        for wid in ids:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[wid]}/metrics", timeout=10) as answer:
                for line in answer.read().decode().splitlines():
                    if line.startswith("azu_worker_step_duration_seconds_sum"):
                        total += float(line.split()[-1])
        return total

    def run_job(self, model_id: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
        """(TTFT s, total s, bytes Redis received meanwhile) of one job, from submit to its events."""
        from azu.network import jobs

        job_id = f"lp-{uuid.uuid4().hex[:12]}"
        before = int(self.r.info("stats")["total_net_input_bytes"])
        t0 = time.perf_counter()
        jobs.submit_job(self.r, jobs.JobRequest(job_id=job_id, user_id="bench", model_id=model_id,
                                                prompt_ids=prompt, max_tokens=max_tokens, stop_token_ids=[]),
                        dispatch=self.dispatch)
        last, first, end = "0-0", None, None
        deadline = time.monotonic() + 900
        while end is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not end")
            last, events = jobs.read_events(self.r, job_id, last_id=last, block_ms=1000)
            for e in events:
                if e.kind == "token" and first is None:
                    first = time.perf_counter()
                elif e.kind == "error":
                    raise SystemExit(f"job {job_id} failed: {e.error}")
                elif e.kind == "done":
                    end = time.perf_counter()
        received = int(self.r.info("stats")["total_net_input_bytes"]) - before
        assert first is not None
        return first - t0, end - t0, received

    def order_layout(self, n: int) -> dict[str, Any]:
        """Order layout ``n``'s loads (the layers split evenly over its ``n`` workers); returns its spans."""
        from azu.engine.local import split_layers
        from azu.network import jobs

        spans = dict(zip(self.worker_ids(n), split_layers(self.num_layers, n), strict=True))
        for wid, span in spans.items():
            jobs.order_load(self.r, wid, self.model_id(n), span, dispatch=self.dispatch)
        return spans

    def wait_loaded(self, layouts: dict[int, dict[str, Any]]) -> None:
        from azu.network import directory

        def held() -> bool:
            live = {w.worker_id: w for w in directory.live_workers(self.r)}
            return all(wid in live and span in live[wid].holds(self.model_id(n))
                       for n, spans in layouts.items() for wid, span in spans.items())

        t = time.perf_counter()
        wait_until(held, 600, "the workers to load their spans")
        took = time.perf_counter() - t
        print(f"layout(s) of {', '.join(map(str, layouts))} workers loaded in {took:.1f} s", flush=True)

    def pipeline(self, n: int, prompt: list[int], size: int) -> dict[str, float]:
        """Time the prompt through layout ``n`` (loaded), each job next to ``generate`` on the same prompt;
        the Redis hand-over is timed now too (the load on the machine changes). Then its workers stop."""
        ids = self.worker_ids(n)
        model_id = self.model_id(n)
        try:
            self.run_job(model_id, prompt[:16], 2)  # warm-up (first steps, Celery wake-ups)
            redis_s = self.time_redis_handover(size)
            best: dict[str, float] = {"redis": redis_s}
            for _ in range(self.args.repeat):
                gen = self.generate_ttft(prompt)
                compute0 = self._worker_compute(ids)
                ttft, total, received = self.run_job(model_id, prompt, self.args.max_tokens)
                compute = self._worker_compute(ids) - compute0
                print(f"  {n} workers: TTFT {_ms(ttft)} (generate next to it {_ms(gen)}), total "
                      f"{_ms(total)}, Redis received {_mb(received)}, workers' forward time {_ms(compute)}",
                      flush=True)
                best["generate"] = min(gen, best.get("generate", gen))
                if "ttft" not in best or ttft < best["ttft"]:
                    best.update(ttft=ttft, total=total, received=received, compute=compute)
            print(f"  one hand-over of {_mb(size)} through Redis now: {_ms(redis_s)}", flush=True)
            return best
        finally:
            for wid in ids:
                self.cluster.stop(wid)


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small Qwen2 (hidden 256 x 6 layers), 256 tokens")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 2048 (--quick: 256)")
    p.add_argument("--max-tokens", type=int, default=1,
                   help="new tokens per job (1: the workers' forward time is the prompt's alone)")
    p.add_argument("--workers", default="2,3", help="worker counts to run, e.g. 2,3")
    p.add_argument("--repeat", type=int, default=2, help="jobs per measurement (the best counts)")
    p.add_argument("--redis-url", default=None,
                   help="an existing Redis >= 7 (its database is flushed); default: a private redis-server")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder (worker and collector logs)")
    args = p.parse_args()
    # SIGTERM (a `timeout`, say) unwinds like Ctrl-C: the worker processes and the redis-server are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shape = SMALL if args.quick else QWEN
    tokens = args.prompt_tokens or (256 if args.quick else 2048)
    counts = [int(k) for k in args.workers.split(",")]
    base = Path(tempfile.mkdtemp(prefix="azu-long-prompt-"))
    redis_proc = None
    redis_url = args.redis_url
    if redis_url is None:
        # Its own redis-server: other work on a shared one would be in the hand-over timings.
        from azu.cli.up import find_redis_server, free_port

        binary = find_redis_server() or "redis-server"
        port = free_port()
        redis_proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(base)], stdout=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{port}/0"
    # Before the rest is imported: the settings, the Celery producer and tests.support.network read these.
    os.environ.update(REDIS_URL=redis_url, AZU_TEST_NETWORK_REDIS_URL=redis_url,
                      AZU_REGISTRY_DIR=str(base / "registry"))
    os.environ.pop("DATABASE_URL", None)  # FreeBilling: money is not what this measures
    from tests.support.network import SECRET

    os.environ["AUTH_SECRET_KEY"] = SECRET  # the core's key: the workers Cluster starts trust its public half
    (base / "registry").mkdir()
    import redis

    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: _ping(client), 20, "redis-server")
    from azu.config import get_settings
    from azu.network.batching import ALONE_CHUNKS

    # A lone prompt (no other job in flight at the worker) runs ALONE_CHUNKS chunks at once.
    chunk = get_settings().worker.prefill_chunk * ALONE_CHUNKS
    rng = random.Random(7)
    prompt = [rng.randrange(3, int(shape["vocab_size"])) for _ in range(tokens)]
    bench = LongPromptBench(args, base, redis_url)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0],
                               "prompt_tokens": tokens, "max_tokens": args.max_tokens, "prefill_chunk": chunk,
                               "model": "small qwen2 256x6" if args.quick else "Qwen2.5-0.5B shape"}
    try:
        bench.build(shape, counts)
        t = time.perf_counter()
        results["stages_ttft"], results["stages_whole_ttft"] = bench.baseline_stages(prompt, [chunk, tokens])
        gc.collect()
        print(f"one process: the same Stages, prompt in chunks of {chunk} {_ms(results['stages_ttft'])}, in "
              f"one piece {_ms(results['stages_whole_ttft'])} ({time.perf_counter() - t:.0f} s)", flush=True)
        # Each chunk goes on as it runs (azu.network.node): a hop hands the prompt over in parts of a chunk.
        part = min(chunk, tokens)
        results["parts"] = -(-tokens // part)
        size = results["hidden_bytes"] = bench.hidden_bytes(part)
        results["codec"] = bench.time_codec(part)
        print(f"hand-over of a {part}-position part, {_mb(size)}: pack/sign/check/unpack "
              f"{_ms(results['codec'])}", flush=True)
        bench.start_network(counts)
        bench.load_generate()
        if args.quick:  # small weights: every layout loads at once (the workers boot their libraries once)
            bench.wait_loaded({n: bench.order_layout(n) for n in counts})
        for n in counts:
            if not args.quick:  # one layout's weights at a time (about 2 GB each, on a shared machine)
                bench.wait_loaded({n: bench.order_layout(n)})
            results[f"azu_{n}"] = bench.pipeline(n, prompt, size)
        results["load_after"] = os.getloadavg()[0]
    finally:
        bench.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        if args.keep:
            print(f"work folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)  # models of several GB
    print()
    print(report(results, counts))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(res: dict[str, Any], counts: list[int]) -> str:
    stages, size, codec_s = res["stages_ttft"], res["hidden_bytes"], res["codec"]
    head = ["row", *[f"{n} workers" for n in counts], "goal"]
    rows: list[list[str]] = []

    def row(label: str, cells: list[str], goal: str = "") -> None:
        rows.append([label, *cells, goal])

    runs = [res[f"azu_{n}"] for n in counts]
    row("azu TTFT (submit to first token event)", [_ms(x["ttft"]) for x in runs])
    row("one process: transformers generate, 1 new token (timed next to it)",
        [_ms(x["generate"]) for x in runs])
    row("**TTFT ratio to generate**", [f"{x['ttft'] / x['generate']:.2f}x" for x in runs], "<= 1.1x")
    row("one process: the same Stages, prompt in one piece", [_ms(res["stages_whole_ttft"])] * len(runs))
    row(f"one process: the same Stages, chunks of {res['prefill_chunk']} (as workers run a lone prompt)",
        [_ms(stages)] * len(runs))
    row("TTFT ratio to the same Stages in chunks", [f"{x['ttft'] / stages:.2f}x" for x in runs])
    row("workers' forward time during the job (their metrics, all workers)",
        [_ms(x["compute"]) for x in runs])
    row("workers' forward time / TTFT (over 1: stages ran at once)",
        [f"{x['compute'] / x['ttft']:.2f}" for x in runs])
    parts = res["parts"]
    handovers = [(n - 1) * parts for n in counts]
    row("hidden-state hand-overs per prompt (hops x parts)", [f"{n - 1} x {parts}" for n in counts])
    row("hidden state per hand-over (safetensors, a chunk's part)", [_mb(size)] * len(runs))
    row("bytes Redis received during the job", [_mb(x["received"]) for x in runs])
    row("one hand-over through Redis (deliver + take, median)", [_ms(x["redis"]) for x in runs])
    shares = [k * x["redis"] / x["ttft"] for k, x in zip(handovers, runs, strict=True)]
    row("**Redis hand-overs, share of TTFT** (all of them, as if none overlapped)",
        [f"{share:.2%}" for share in shares], f"<= {REDIS_SHARE_LIMIT:.0%} (else a direct path)")
    row("pack + sign + check + unpack per hand-over", [_ms(codec_s)] * len(runs))
    row("pack/sign/check/unpack, share of TTFT",
        [f"{k * codec_s / x['ttft']:.2%}" for k, x in zip(handovers, runs, strict=True)])
    lines = [f"{res['model']}, fp32, CPU, 1 thread per process; prompt {res['prompt_tokens']} random ids, "
             f"max_tokens {res['max_tokens']}, lone prompt's chunk {res['prefill_chunk']}; best of the runs; "
             f"1-min load average {res['load_before']:.1f} at start, {res['load_after']:.1f} at end "
             f"({os.cpu_count()} CPUs)",
             "", table(rows, head)]
    worst = max(shares)
    verdict = "over" if worst > REDIS_SHARE_LIMIT else "within"
    lines += ["", f"Redis share of TTFT at most {worst:.2%}: {verdict} the {REDIS_SHARE_LIMIT:.0%} budget."]
    return "\n".join(lines)


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
