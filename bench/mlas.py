"""An experiment: ONNX Runtime's MLAS on prepacked weights against the kernels azu's CPU stages run.

    pip install -e .    # ONNX Runtime and onnx are azu dependencies
    python bench/mlas.py [--rounds 3] [--head] [--bound] [--pairs 2]

What MLAS gives against the kernels a stage runs otherwise, figures from one run:

- **Products** (always): one Qwen-shaped layer's linears (``kernels.layer_shapes``), one thread, for 1, 2, 4,
  8, 16, 32 and 128 rows, in ms (median of ``--rounds``, each the best of five runs, the kinds interleaved):
  MKL on the weight as loaded (``F.linear``, what ``generate`` runs), numpy's BLAS on the transposed weight
  (what a stage on an AVX2 CPU took in the twenty-sixth session), and MLAS on its own packed copy of the
  weight (an ONNX ``MatMul`` whose weight is a constant: ONNX Runtime packs it once, at session start).
  With ``--head``, one product of the 151936 x 896 head, in the 32 MB blocks a stage holds it in.
- **Memory**, each figure in a fresh process (in one that has freed sessions before, new ones reuse those
  pages and the RSS hardly grows) after one session made and dropped (``warm_up``): the RSS a layer's and the
  head's MLAS sessions add, per byte of their weights; what one session holds beside its weight; and what a
  process's first session costs once. The weight reaches the session as an in-memory "external data file",
  so ONNX Runtime allocates it itself and frees it once packed.
- **The 16-stream bound** (``--bound``): ``bench/_stream_bound.py`` on a Qwen-shaped model's two stages in
  this process, in ``--pairs`` alternating pairs: the stages as planned (``AZU_CPU_KERNELS=auto``: whatever
  layouts this CPU's figures call for, moves under batches included), and the same stages held transposed
  with every product of 2-32 rows on MLAS (one packed copy per block, made on first use and held beside the
  block: a what-if of the kernels, not of the memory), the other row counts as the plan runs them there.

azu runs MLAS as a layout since the thirtieth session (``azu.engine.mlas``; docs/architecture.md, "ONNX
Runtime's MLAS as a layout"), a batch layout where it runs batches clearly faster and one row clearly slower:
a move off it reads the rows from the shard files again, since MLAS's packed copy cannot be read back. This
script stays as the experiment that led there: the kernels side by side, and the bound with MLAS forced on.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _support import QWEN, row_blocks, rss_mb, stream_prompts

from azu.engine import kernels
from azu.engine.mlas import MlasWeight

HIDDEN, VOCAB = 896, 151936
QWEN_LAYER = {"num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864}
ROWS = (1, 2, 4, 8, 16, 32, 128)
MLAS_ROWS = (2, 32)  # --bound: the row counts MLAS runs on the transposed layout, inclusive


def mlas_session(weight: np.ndarray) -> Any:
    """The ONNX Runtime session a stage's MLAS layout holds for the block ``weight`` (``(in, out)``,
    float32): ``x @ weight``, the weight packed at session start (``azu.engine.mlas.MlasWeight``; ONNX Runtime
    frees its copy of the weight once packed)."""
    return MlasWeight(torch.from_numpy(weight).t()).session


def mlas_product(session: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"x": x.detach().contiguous().numpy()})[0])


def trim_heap() -> None:
    from azu.engine.heap import release_freed_memory

    gc.collect()
    release_freed_memory()


def warm_up() -> float:
    """One session made and dropped before a memory figure: ONNX Runtime's one-time state in a process is not
    a session's (counted in, it made one session of 50 look 0.26 MB heavier than its weight, not 0.07; with
    the libraries' load too, 0.87). The MB of RSS that first session left (the libraries loaded before)."""
    trim_heap()
    before = rss_mb()
    mlas_session(np.zeros((8, 8), np.float32))
    trim_heap()
    return rss_mb() - before


def session_overhead(sessions: int = 50) -> float:
    """Bytes of RSS a session holds beside its weight's (a stage would hold one per block of each linear)."""
    weight = np.zeros((HIDDEN, 128), np.float32)
    warm_up()
    before = rss_mb()
    held = [mlas_session(weight) for _ in range(sessions)]
    trim_heap()
    grown = (rss_mb() - before) * 2**20
    del held
    return grown / sessions - weight.nbytes


def transposed_blocks(weight: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``weight`` (``(out, in)``) in the 32 MB row blocks a stage holds it in, as loaded and transposed."""
    blocks = row_blocks(weight)
    return blocks, [kernels.TransposedLinear.convert(b) for b in blocks]


def sessions_rss(weights: list[torch.Tensor]) -> float:
    """The RSS the MLAS sessions of ``weights`` add, per byte of the weights (run in a fresh process)."""
    transposed = [t for w in weights for t in transposed_blocks(w)[1]]
    warm_up()
    before = rss_mb()
    sessions = [mlas_session(t.numpy()) for t in transposed]
    trim_heap()
    grown = (rss_mb() - before) * 2**20
    del sessions
    return grown / sum(t.numel() * 4 for t in transposed)


def random_weights(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.empty(out_f, in_f).uniform_(-0.05, 0.05, generator=gen) for out_f, in_f in shapes]


def fresh(figure: str) -> float:
    """A memory figure (``MEMORY``), measured in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--memory", figure], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


MEMORY: dict[str, Callable[[], float]] = {
    "layer": lambda: sessions_rss(random_weights(list(kernels.layer_shapes(QWEN_LAYER, HIDDEN)), 1)),
    "head": lambda: sessions_rss(random_weights([(VOCAB, HIDDEN)], 2)),
    "session": lambda: session_overhead() / 2**20,
    "first": warm_up,
}


def product_times(weight: torch.Tensor, rows: tuple[int, ...], rounds: int
                  ) -> dict[tuple[str, int], list[float]]:
    """ms of the products with ``weight`` (``(out, in)``, in 32 MB row blocks) per kind and rows, one figure
    per round."""
    blocks, transposed = transposed_blocks(weight)
    sessions = [mlas_session(t.numpy()) for t in transposed]
    ways: dict[str, Callable[[torch.Tensor], object]] = {
        "mkl": lambda x: [F.linear(x, b) for b in blocks],
        "mlas": lambda x: [mlas_product(s, x) for s in sessions],
    }
    if kernels.blas_works():
        ways["blas"] = lambda x: [kernels._blas_product(x, t) for t in transposed]
    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for r in rows:
            x = torch.randn(r, weight.shape[1], generator=gen)
            # A kernel is timed only if it computes the same products (up to float rounding).
            want = torch.cat([F.linear(x, b) for b in blocks], dim=1)
            got = torch.cat([mlas_product(s, x) for s in sessions], dim=1)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                raise SystemExit(f"MLAS's products differ from F.linear's at {r} rows")
            for _ in range(rounds):
                best: dict[str, float] = {}
                for _ in range(5):
                    for kind, run in ways.items():
                        start = time.perf_counter()
                        run(x)
                        took = (time.perf_counter() - start) * 1e3
                        best[kind] = min(took, best.get(kind, took))
                for kind, took in best.items():
                    times.setdefault((kind, r), []).append(took)
    return times


def layer_times(rounds: int) -> dict[tuple[str, int], list[float]]:
    """One Qwen-shaped layer's products, summed over its weights (each measured in turn, so one weight's
    sessions are held at a time)."""
    totals: dict[tuple[str, int], list[float]] = {}
    for shape in kernels.layer_shapes(QWEN_LAYER, HIDDEN):
        (w,) = random_weights([shape], 1)
        for key, figures in product_times(w, ROWS, rounds).items():
            got = totals.setdefault(key, [0.0] * len(figures))
            for i, f in enumerate(figures):
                got[i] += f
        del w
        trim_heap()
    return totals


def table(title: str, times: dict[tuple[str, int], list[float]], rows: tuple[int, ...]) -> str:
    names = {"mkl": "MKL as loaded", "blas": "numpy BLAS transposed", "mlas": "MLAS packed"}
    kinds = [k for k in names if all((k, r) in times for r in rows)]
    lines = [f"\n{title}\n", "| rows | " + " | ".join(names[k] for k in kinds) + " | MLAS / numpy BLAS |",
             "|---|" + "---|" * (len(kinds) + 1)]
    for r in rows:
        mid = {k: statistics.median(times[k, r]) for k in kinds}
        cells = [f"{mid[k]:.2f}, {mid[k] / mid['mkl']:.2f}x" for k in kinds]
        versus = f"{mid['mlas'] / mid['blas']:.2f}" if "blas" in mid else "-"
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {versus} |")
    return "\n".join(lines)


def bound_pairs(pairs: int) -> list[tuple[str, str]]:
    """The 16-stream bound, as planned and with MLAS for 2-32 rows, in alternating pairs."""
    import _stream_bound

    from azu.cli import demo
    from azu.engine import stage
    from azu.registry.sharder import shard_model

    transposed_block = kernels.TransposedLinear._block
    plan_for = stage.plan_for
    plans: list[str] = []  # the stages' plans in this measurement, as their workers would log them

    def planned(*args: Any, **kwargs: Any) -> kernels.KernelPlan | None:
        plan = plan_for(*args, **kwargs)
        plans.append(plan.describe() if plan is not None else "PyTorch's linear")
        return plan

    packed: dict[tuple[int, tuple[int, ...]], Any] = {}
    on_mlas = [0]  # products MLAS ran in this measurement

    def block_product(self: kernels.TransposedLinear, x: torch.Tensor, block: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if not MLAS_ROWS[0] <= x.shape[0] <= MLAS_ROWS[1]:
            return transposed_block(self, x, block, bias)
        key = (block.data_ptr(), tuple(block.shape))
        if key not in packed:
            packed[key] = mlas_session(block.numpy())
        on_mlas[0] += 1
        out = mlas_product(packed[key], x)
        return out if bias is None else out.add_(bias)

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        print("[bench] building a Qwen-shaped model...", file=sys.stderr, flush=True)
        src = demo.build_model("qwen2", Path(tmp) / "src", seed=1, **QWEN)
        shard_model(str(src), Path(tmp) / "shards", progress=False)
        prompts = stream_prompts(16)
        for i in range(pairs):
            pair = []
            for mlas in (False, True):
                print(f"[bench] bound, pair {i + 1} of {pairs}, {'MLAS' if mlas else 'as planned'}...",
                      file=sys.stderr, flush=True)
                packed.clear()
                on_mlas[0] = 0
                plans.clear()
                # MLAS: the stages held transposed (one user's rows as the plan runs them there), every
                # product of 2-32 rows on MLAS, whatever layout the plan would move the batches to.
                kernels.TransposedLinear._block = block_product if mlas else transposed_block  # type: ignore[method-assign]
                stage.plan_for = planned  # type: ignore[assignment]
                try:
                    got = _stream_bound.measure(Path(tmp) / "shards", 17, 24, prompts,
                                                kernels="transposed" if mlas else "auto").describe()
                finally:
                    kernels.TransposedLinear._block = transposed_block  # type: ignore[method-assign]
                    stage.plan_for = plan_for
                pair.append(got + (f" ({on_mlas[0]} products on MLAS)" if mlas else
                                   f" (plans: {' / '.join(plans)})"))
                trim_heap()
            out.append((pair[0], pair[1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="measurements of the products (the median counts)")
    p.add_argument("--head", action="store_true", help="also one product of the Qwen shape's head")
    p.add_argument("--bound", action="store_true", help="also the 16-stream bound, as planned and with MLAS")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of the bound")
    p.add_argument("--memory", choices=sorted(MEMORY), help=argparse.SUPPRESS)  # one figure, a fresh process
    args = p.parse_args()
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        print("this experiment needs ONNX Runtime and onnx: pip install onnxruntime onnx", file=sys.stderr)
        return 1
    torch.set_num_threads(1)  # as a worker runs (OMP_NUM_THREADS=1 in bench/pipeline.py)
    if args.memory:
        print(MEMORY[args.memory]())
        return 0
    print(f"ONNX Runtime {onnxruntime.__version__}, numpy {np.__version__}, PyTorch {torch.__version__}; "
          "one thread; ms (median of the rounds) and the ratio to MKL as loaded")
    print(table("one Qwen-shaped layer's products", layer_times(args.rounds), ROWS))
    print(f"\nRSS a layer's MLAS sessions add (a fresh process): {fresh('layer'):.2f} bytes per byte of its "
          "weights; one session beside its weight (50 sessions of a 896 x 128 weight): "
          f"{fresh('session'):.2f} MB; a process's first session, once: {fresh('first'):.1f} MB (each figure "
          "after a first session made and dropped but this one)")
    if args.head:
        (head,) = random_weights([(VOCAB, HIDDEN)], 2)
        print(table(f"the head ({VOCAB} x {HIDDEN}), one product", product_times(head, ROWS[:5], args.rounds),
                    ROWS[:5]))
        del head
        trim_heap()
        print(f"\nRSS the head's MLAS sessions add (a fresh process): {fresh('head'):.2f} bytes per byte "
              "of its weight")
    if args.bound:
        print("\nthe 16-stream bound (bench/_stream_bound.py, Qwen shape, 17 + 7 layers), alternating "
              "pairs:\n")
        print("| pair | as planned | MLAS for 2-32 rows |\n|---|---|---|")
        for i, (planned, mlas) in enumerate(bound_pairs(args.pairs)):
            print(f"| {i + 1} | {planned} | {mlas} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
