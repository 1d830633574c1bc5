"""Engine benchmark: one run, one table, everything side by side in this run (ratios, not absolutes).

    python bench/engine.py                       # CPU, float32, Qwen2.5-0.5B-shaped random model
    python bench/engine.py --device cuda --dtype bfloat16

Rows:
  decode tok/s      transformers `generate` (greedy) vs the engine's 2-stage loop in one process; on a
                    GPU also the engine with its one-token steps eager vs as CUDA graph replays
                    (azu.engine.graphs)
  prefill 512       one forward of a 512-token prompt: transformers vs the engine's 2 stages
  batched decode    16 jobs decoding together (Stage.forward_batch) vs 1 job, aggregate tok/s; 8 jobs at 512
                    positions vs at 32 (what a longer context costs a batch)
  stage peak RSS    a stage holding half the layers (+ embeddings) vs the bytes of the tensors it holds:
                    peak at load, and RSS after 16 jobs' KV caches are freed (each a fresh process)
  whole-model RSS   transformers from_pretrained of the same model vs all weight bytes
  shard MB/s, RSS   `azu shard` vs a plain safetensors read of the same files (bench/shard.py)

Timing rows alternate the two sides round by round in one process and report medians; memory rows
each run in a fresh subprocess (peak RSS minus the RSS after imports).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _support import rss_mb, synchronize

QWEN05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
CACHE = Path(os.environ.get("AZU_BENCH_CACHE", "/tmp/azu-bench-cache"))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prepare(dtype: str) -> tuple[Path, Path]:
    """Build (once) the random Qwen2.5-0.5B-shaped model and its shard folder."""
    import torch
    import transformers

    from azu.registry.sharder import shard_model

    root = CACHE / f"qwen05b-{dtype}"
    src, shards = root / "src", root / "shards"
    if not (src / "config.json").exists():
        log(f"building a random Qwen2.5-0.5B-shaped model ({dtype}) in {src} (once)...")
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**QWEN05B)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(src, max_shard_size="500MB")
        del model
    if not (shards / "manifest.json").exists():
        log("sharding it with azu shard (once)...")
        shard_model(src, shards, progress=False)
    return src, shards


# -- child: timings (both sides in one process, alternating) -------------------------------------------
def child_timings(src: str, shards: str, device: str, dtype: str, new_tokens: int, rounds: int) -> dict:
    import torch
    import transformers

    from azu.engine.local import LocalPipeline

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).to(device).eval()
    pipe = LocalPipeline(shards, 2, device=device, dtype=dtype)
    # On a GPU the engine replays its one-token steps as CUDA graphs ("auto"); the same engine eager beside.
    graphed = device.startswith("cuda")
    eager = LocalPipeline(shards, 2, device=device, dtype=dtype, graphs="off") if graphed else pipe
    vocab = hf.config.vocab_size
    prompt = torch.randint(100, vocab, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    long_prompt = torch.randint(100, vocab, (512,), generator=torch.Generator().manual_seed(2)).tolist()

    sync = functools.partial(synchronize, device)

    def hf_generate() -> tuple[float, list[int]]:
        ids = torch.tensor([prompt], device=device)
        sync()
        t = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        sync()
        return time.perf_counter() - t, out[0, len(prompt) :].tolist()

    def engine_generate(engine: LocalPipeline = pipe) -> tuple[float, list[int]]:
        sync()
        t = time.perf_counter()
        res = engine.generate(prompt, max_tokens=new_tokens)
        sync()
        return time.perf_counter() - t, res.token_ids

    @torch.inference_mode()
    def hf_prefill() -> float:
        ids = torch.tensor([long_prompt], device=device)
        sync()
        t = time.perf_counter()
        hf(ids, use_cache=True, logits_to_keep=1)
        sync()
        return time.perf_counter() - t

    def engine_prefill() -> float:
        ids = torch.tensor(long_prompt)
        sync()
        t = time.perf_counter()
        pipe.step("prefill", ids)
        sync()
        dt = time.perf_counter() - t
        for stage in pipe.stages:
            stage.end_job("prefill")
        return dt

    def engine_batched(n_jobs: int, steps: int, job_prompt: list[int] = prompt) -> float:
        """Aggregate decode tok/s of n_jobs decoding together (after one prefill of ``job_prompt`` each)."""
        jobs = [f"b{i}" for i in range(n_jobs)]
        nxt = {}
        for j in jobs:
            nxt[j] = torch.tensor([int(pipe.step(j, torch.tensor(job_prompt)).argmax())])
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            xs = [nxt[j] for j in jobs]
            for stage in pipe.stages:
                xs = stage.forward_batch(list(zip(jobs, xs, strict=True)))
            for j, logits in zip(jobs, xs, strict=True):
                nxt[j] = torch.tensor([int(logits.argmax())])
        sync()
        dt = time.perf_counter() - t
        for stage in pipe.stages:
            for j in jobs:
                stage.end_job(j)
        return n_jobs * steps / dt

    # warm-up both sides (allocators, kernels; the engine's first decode graphs are recorded here)
    hf_generate()
    engine_generate()
    if graphed:
        engine_generate(eager)
    hf_t, eng_t, eager_t, hf_p, eng_p, b1, b16 = [], [], [], [], [], [], []
    same = same_eager = True
    for r in range(rounds):
        t1, toks_hf = hf_generate()
        t2, toks_eng = engine_generate()
        same = same and toks_hf == toks_eng
        hf_t.append(new_tokens / t1)
        eng_t.append(new_tokens / t2)
        if graphed:
            t3, toks_eager = engine_generate(eager)
            same_eager = same_eager and toks_hf == toks_eager
            eager_t.append(new_tokens / t3)
        hf_p.append(hf_prefill())
        eng_p.append(engine_prefill())
        b1.append(engine_batched(1, 16))
        b16.append(engine_batched(16, 16))
        log(f"round {r + 1}/{rounds}: generate {hf_t[-1]:.1f} tok/s, engine {eng_t[-1]:.1f} tok/s"
            + (f" (eager {eager_t[-1]:.1f})" if eager_t else "")
            + f", batched 16 {b16[-1]:.1f} vs 1 {b1[-1]:.1f} tok/s")
    # What a longer context costs batched decode (the caches' copies, attention): 8 jobs at 512 positions
    # against the same 8 at 32, once (the 512-token prefills take most of a minute on a CPU).
    b8_long = engine_batched(8, 8, long_prompt)
    b8_short = engine_batched(8, 8)
    med = statistics.median
    return {
        "hf_tok_s": med(hf_t),
        "engine_tok_s": med(eng_t),
        "same_tokens": same,
        "eager_tok_s": med(eager_t) if eager_t else None,
        "same_tokens_eager": same_eager,
        "hf_prefill_s": med(hf_p),
        "engine_prefill_s": med(eng_p),
        "batch1_tok_s": med(b1),
        "batch16_tok_s": med(b16),
        "batch8_short_tok_s": b8_short,
        "batch8_long_tok_s": b8_long,
    }


# -- children: memory -----------------------------------------------------------------------------------
def _peak_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries the forking parent's
    high-water mark through fork and exec into it, so a child forked from a parent that had just built a
    model reported that model's size as its own peak (a 2.0x "peak at load" that was the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage_weights_mb(stage) -> tuple[float, set[str]]:
    """Bytes of the distinct tensors a stage holds (what it loaded, in the dtype it holds them), dtypes."""
    from azu.engine.kernels import BlockedLinear
    from azu.engine.mlas import MlasWeight

    seen: dict[int, int] = {}
    dtypes = set()
    for tensor in [*stage.model.parameters(), *stage.model.buffers()]:
        if tensor.is_meta or not tensor.is_floating_point():
            continue
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
    packed = 0
    for module in stage.model.modules():
        if isinstance(module, BlockedLinear):  # weights packed or transposed: not parameters any more
            for tensor in [*module.blocks, *(b for b in module.biases if b is not None)]:
                if isinstance(tensor, MlasWeight):  # packed by ONNX Runtime, in float32
                    packed += tensor.nbytes
                    dtypes.add("float32")
                    continue
                packed += tensor.numel() * tensor.element_size()
                dtypes.add(str(tensor.dtype).removeprefix("torch."))
    return (sum(seen.values()) + packed) / 2**20, dtypes


def child_stage_rss(shards: str, device: str, dtype: str, jobs: int, prompt: int, steps: int,
                    end: str = "first", kernels: str = "auto") -> dict:
    """Fresh process: a stage of embeddings + half the layers (``end="last"``: the other half and the head,
    loaded only); peak RSS at load, then (jobs > 0) RSS after ``jobs`` jobs (``prompt``-token prefills,
    ``steps`` batched decode steps) have ended. ``kernels``: the stage's ``AZU_CPU_KERNELS``.

    The baseline is the RSS after imports, the family's modeling code included (``Stage.load`` imports it
    lazily: ~90 MB of Python modules any worker process carries, whatever it holds), and ONNX Runtime and
    onnx where installed (a CPU stage's measurement imports them: 30 MB of modules, counted as the stage's
    until the thirtieth session); it is reported, not counted. ONNX Runtime's state after its first session
    (~18 MB) is counted. Weights are the bytes of the tensors the stage ends up holding, so a stage that
    silently kept another dtype than the one asked for (or a second copy) shows up here.
    """
    import importlib

    import torch
    import transformers  # noqa: F401

    from azu.engine.span import Span
    from azu.engine.stage import Stage
    from azu.registry.manifest import Manifest

    manifest = Manifest.load(shards)
    half = manifest.num_layers // 2
    start = rss_mb()
    importlib.import_module(f"transformers.models.{manifest.model_type}.modeling_{manifest.model_type}")
    for module in ("onnxruntime", "onnx"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    base = rss_mb()
    span = Span(0, half, embeddings=True) if end == "first" else Span(half, manifest.num_layers, head=True)
    stage = Stage.load(shards, span, device=device, dtype=dtype, kernels=kernels)
    load_peak = _peak_mb() - base
    weights, dtypes = _stage_weights_mb(stage)
    out = {
        "weights_mb": weights,
        "dtypes": sorted(dtypes),
        "imports_mb": base - start,
        "load_peak_mb": load_peak,
        "load_rss_mb": rss_mb() - base,
    }
    if jobs:
        gen = torch.Generator().manual_seed(0)
        names = [f"job{i}" for i in range(jobs)]
        for name in names:
            stage.forward(name, torch.randint(100, 1000, (prompt,), generator=gen))
        for _ in range(steps):
            stage.forward_batch([(n, torch.randint(100, 1000, (1,), generator=gen)) for n in names])
        out["jobs_rss_mb"] = rss_mb() - base
        out["jobs_peak_mb"] = _peak_mb() - base
        for name in names:
            stage.end_job(name)
        out["freed_rss_mb"] = rss_mb() - base
        # A stage whose plan has a batch layout moved its weights to it during the batched steps: idle, a
        # worker moves them back (azu.engine.kernels.LayoutSwitch), as here.
        out["moves"] = stage.layouts.switches if stage.layouts is not None else 0
        while stage.move_layouts_when_idle():
            pass
        out["moved_back_rss_mb"] = rss_mb() - base
        out["moves_back"] = (stage.layouts.switches if stage.layouts is not None else 0) - out["moves"]
    return out


def child_whole_rss(src: str, shards: str, device: str, dtype: str) -> dict:
    import torch
    import transformers

    from azu.registry.manifest import Manifest

    manifest = Manifest.load(shards)
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    src_elem = {"float32": 4, "bfloat16": 2, "float16": 2}.get(manifest.torch_dtype or "float32", 4)
    # the head file of a tied model is a clone of the embeddings: count the weights once
    total = sum(f.size for f in manifest.files if not (manifest.tied_head and f.kind == "head"))
    base = rss_mb()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).to(device)
    model(torch.arange(100, 132, device=device)[None])
    return {"weights_mb": total * elem / src_elem / 2**20, "peak_mb": _peak_mb() - base}


def run_child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{out.stderr[-3000:]}")
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_row(label: str, weights_mb: float, measured_mb: float, target: str) -> tuple[str, ...]:
    """A memory row of the table: the weights' MB, the MB measured, their ratio."""
    return (label, f"{weights_mb:.0f} (weights)", f"{measured_mb:.0f}", f"{measured_mb / weights_mb:.3f}x",
            target)


def timing_rows(t: dict) -> list[tuple[str, ...]]:
    return [
        (
            "decode tok/s (32-token prompt, greedy)",
            f"{t['hf_tok_s']:.1f}",
            f"{t['engine_tok_s']:.1f}",
            f"{t['engine_tok_s'] / t['hf_tok_s']:.3f}x",
            ">= 0.98x",
        ),
        ("same greedy tokens", "-", "-", "yes" if t["same_tokens"] else "NO", "yes"),
        *([(
            "decode tok/s: engine eager vs one-token steps as CUDA graphs",
            f"{t['eager_tok_s']:.1f}",
            f"{t['engine_tok_s']:.1f}",
            f"{t['engine_tok_s'] / t['eager_tok_s']:.2f}x",
            "",
        ), ("same greedy tokens (engine eager)", "-", "-", "yes" if t["same_tokens_eager"] else "NO", "yes")]
          if t.get("eager_tok_s") else []),
        (
            "prefill 512 tokens (s)",
            f"{t['hf_prefill_s']:.3f}",
            f"{t['engine_prefill_s']:.3f}",
            f"{t['hf_prefill_s'] / t['engine_prefill_s']:.3f}x speed",
            "",
        ),
        (
            "decode, 16 jobs batched vs 1 job (agg tok/s)",
            f"{t['batch1_tok_s']:.1f}",
            f"{t['batch16_tok_s']:.1f}",
            f"{t['batch16_tok_s'] / t['batch1_tok_s']:.2f}x",
            "",
        ),
        (
            "decode, 8 jobs batched: at 512 positions vs at 32 (agg tok/s)",
            f"{t['batch8_short_tok_s']:.1f}",
            f"{t['batch8_long_tok_s']:.1f}",
            f"{t['batch8_long_tok_s'] / t['batch8_short_tok_s']:.2f}x",
            "",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda by default")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--job-prompt",
        type=int,
        default=256,
        help="prompt tokens of each of the 16 jobs of the stage-memory row",
    )
    parser.add_argument("--skip-shard", action="store_true", help="leave out the sharding rows")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory rows")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the stage memory rows (no timings, whole-model or sharding rows)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    if args.child:
        fn = {"timings": child_timings, "stage_rss": child_stage_rss, "whole_rss": child_whole_rss}[
            args.child
        ]
        conv = [int(a) if a.isdigit() else a for a in args.rest]
        print(json.dumps(fn(*conv)))
        return 0

    src, shards = prepare(dtype)
    rows: list[tuple[str, ...]] = []
    if not args.memory_only:
        log("timings (both sides in one process, alternating rounds)...")
        t = run_child(
            "timings", str(src), str(shards), args.device, dtype, str(args.new_tokens), str(args.rounds)
        )
        rows += timing_rows(t)
        for row in rows:  # now: a run cut short later still shows them
            log(" | ".join(row))
    if args.skip_memory:
        return print_table(args, dtype, rows)
    log("memory (fresh subprocesses)...")
    st = run_child("stage_rss", str(shards), args.device, dtype, "0", "0", "0")
    sj = run_child("stage_rss", str(shards), args.device, dtype, "16", str(args.job_prompt), "32")
    sh = run_child("stage_rss", str(shards), args.device, dtype, "0", "0", "0", "last")

    def at_most(r: dict) -> str:  # the target, and a stage that kept another dtype than the one asked for
        return "<= 1.15x" + ("" if r["dtypes"] == [dtype] else f" (NOT {dtype})")

    rows += [
        memory_row(f"stage (embeddings + half the layers) peak RSS MB at load ({'/'.join(st['dtypes'])}; "
                   f"imports {st['imports_mb']:.0f} MB not counted)", st["weights_mb"], st["load_peak_mb"],
                   at_most(st)),
        memory_row(f"stage (other half of the layers + head) peak RSS MB at load ({'/'.join(sh['dtypes'])})",
                   sh["weights_mb"], sh["load_peak_mb"], at_most(sh)),
        memory_row(f"first stage, RSS MB after 16 jobs ({args.job_prompt}-token prompts, 32 batched steps) "
                   f"ended (peak {sj['jobs_peak_mb']:.0f} with their caches; weights moved to the batch "
                   f"layout: {'yes' if sj['moves'] else 'no'})", sj["weights_mb"], sj["freed_rss_mb"],
                   "<= 1.15x"),
    ]
    if sj["moves_back"]:
        label = "first stage, RSS MB once idle moves took its weights back to one user's layout"
        rows.append(memory_row(label, sj["weights_mb"], sj["moved_back_rss_mb"], "<= 1.15x"))
    if dtype == "float32" and args.device == "cpu":
        # A float32 stage from bfloat16 files: its weights are cast copies, not views of the file buffers
        # whose pages a stage hands back as it converts them (azu.engine.kernels.apply_plan): on the loaded
        # layout and on one that copies every weight (transposed).
        _, shards16 = prepare("bfloat16")
        for kernels in ("plain", "transposed"):
            sc = run_child("stage_rss", str(shards16), args.device, "float32", "0", "0", "0", "last", kernels)
            label = (f"stage (other half of the layers + head) from bfloat16 files, peak RSS MB at load "
                     f"({'/'.join(sc['dtypes'])}, AZU_CPU_KERNELS={kernels})")
            rows.append(memory_row(label, sc["weights_mb"], sc["load_peak_mb"], "<= 1.15x"))
    if not args.memory_only:
        wh = run_child("whole_rss", str(src), str(shards), args.device, dtype)
        rows.append(memory_row("whole model (transformers) peak RSS MB", wh["weights_mb"], wh["peak_mb"], ""))
    if not args.skip_shard and not args.memory_only:
        shard_bench = Path(__file__).with_name("shard.py")
        if shard_bench.exists():
            log("sharding rows (bench/shard.py)...")
            out = subprocess.run(
                [sys.executable, str(shard_bench), "--json", "--repeat", "1"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0 and out.stdout.strip():
                for row in json.loads(out.stdout.strip().splitlines()[-1]).get("rows", []):
                    rows.append(tuple(row))
            else:
                log(f"bench/shard.py failed: {out.stderr[-500:]}")
    return print_table(args, dtype, rows)


def print_table(args: argparse.Namespace, dtype: str, rows: list[tuple[str, ...]]) -> int:
    print(
        f"\nazu engine benchmark — {args.device}, {dtype}, Qwen2.5-0.5B-shaped random model "
        f"({QWEN05B['num_hidden_layers']} layers, hidden {QWEN05B['hidden_size']}), torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}\n"
    )
    header = ("measure", "baseline", "azu", "ratio", "target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
