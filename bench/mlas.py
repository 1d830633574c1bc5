"""An experiment: ONNX Runtime's MLAS on prepacked weights against the kernels azu's CPU stages run.

    pip install onnxruntime onnx    # not azu dependencies: this script only
    python bench/mlas.py [--rounds 3] [--head] [--bound] [--pairs 2]

azu does not run MLAS. This measures what it would give, so the decision rests on figures from one run:

- **Products** (always): one Qwen-shaped layer's linears (``kernels.layer_shapes``), one thread, for 1, 2, 4,
  8, 16, 32 and 128 rows, in ms (median of ``--rounds``, each the best of five runs, the kinds interleaved):
  MKL on the weight as loaded (``F.linear``, what ``generate`` runs), numpy's BLAS on the transposed weight
  (what a stage on an AVX2 CPU took in the twenty-sixth session), and MLAS on its own packed copy of the
  weight (an ONNX ``MatMul`` whose weight is a constant: ONNX Runtime packs it once, at session start).
  With ``--head``, one product of the 151936 x 896 head, in the 32 MB blocks a stage holds it in.
- **Memory**: the RSS the MLAS sessions added, per byte of their weights, and what one session holds beside
  its weight. The weight reaches the session as an in-memory "external data file", so ONNX Runtime
  allocates it itself and frees it once packed.
- **The 16-stream bound** (``--bound``): ``bench/_stream_bound.py`` on a Qwen-shaped model's two stages in
  this process, in ``--pairs`` alternating pairs: the stages as planned, and the same stages with every
  product of 2-32 rows that the plan runs on numpy's BLAS run on MLAS instead (one packed copy per block,
  made on first use and held beside the block: a what-if of the kernels, not of the memory). Where the plan
  runs no row count on numpy's BLAS (another layout wins on this CPU), the two are the same code.

Why azu does not take it (see docs/architecture.md): MLAS's packed copy cannot be read back. A stage that
moves its weights to the batches' layout under load must move them back to one user's layout (on the AVX2
machines MLAS ran one row slower than numpy's BLAS) bit for bit, and ONNX Runtime gives no way to read the
packed weight; keeping the original beside it doubles the stage's memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from azu.engine import kernels

HIDDEN, VOCAB = 896, 151936
QWEN_LAYER = {"num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864}
ROWS = (1, 2, 4, 8, 16, 32, 128)
MLAS_ROWS = (2, 32)  # --bound: the row counts MLAS takes over from numpy's BLAS, inclusive


def mlas_session(weight: np.ndarray) -> Any:
    """A one-thread ONNX Runtime session computing ``x @ weight`` (``weight`` is ``(in, out)``, float32),
    the weight packed by ONNX Runtime at session start. It is handed over as an in-memory external data file:
    ONNX Runtime then allocates the tensor itself and frees it after packing (a weight embedded in the model's
    bytes was kept beside its packed copy)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, n = weight.shape
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(weight.nbytes))):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.add_external_initializers_from_files_in_memory(["w.bin"], [weight], [weight.nbytes])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def mlas_product(session: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"x": x.detach().contiguous().numpy()})[0])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim_heap() -> None:
    from azu.engine.heap import release_freed_memory

    gc.collect()
    release_freed_memory()


def session_overhead(sessions: int = 50) -> float:
    """Bytes of RSS a session holds beside its weight's (a stage would hold one per block of each linear)."""
    weight = np.zeros((HIDDEN, 128), np.float32)
    trim_heap()
    before = rss_bytes()
    held = [mlas_session(weight) for _ in range(sessions)]
    trim_heap()
    grown = rss_bytes() - before
    del held
    return grown / sessions - weight.nbytes


def product_times(weights: list[torch.Tensor], rows: tuple[int, ...], rounds: int
                  ) -> tuple[dict[tuple[str, int], list[float]], float]:
    """ms of the products with ``weights`` (``(out, in)`` each, all of one input width, in 32 MB row blocks)
    per kind and rows, one figure per round; and the RSS the MLAS sessions added per byte of weight."""
    blocks = [w[i:i + kernels.block_rows(w.shape[1])] for w in weights
              for i in range(0, w.shape[0], kernels.block_rows(w.shape[1]))]
    transposed = [kernels.TransposedLinear.convert(b) for b in blocks]
    trim_heap()
    before = rss_bytes()
    sessions = [mlas_session(t.numpy()) for t in transposed]
    trim_heap()
    per_byte = (rss_bytes() - before) / sum(b.numel() * 4 for b in blocks)
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
            x = torch.randn(r, weights[0].shape[1], generator=gen)
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
    return times, per_byte


def layer_times(rounds: int) -> tuple[dict[tuple[str, int], list[float]], float]:
    """One Qwen-shaped layer's products, summed over its weights (each measured in turn, so one weight's
    sessions are held at a time)."""
    gen = torch.Generator().manual_seed(1)
    shapes = kernels.layer_shapes(QWEN_LAYER, HIDDEN)
    totals: dict[tuple[str, int], list[float]] = {}
    weighted, size = 0.0, 0
    for out_f, in_f in shapes:
        w = torch.empty(out_f, in_f).uniform_(-0.05, 0.05, generator=gen)
        times, per_byte = product_times([w], ROWS, rounds)
        weighted += per_byte * w.numel() * 4
        size += w.numel() * 4
        for key, figures in times.items():
            got = totals.setdefault(key, [0.0] * len(figures))
            for i, f in enumerate(figures):
                got[i] += f
        del w, times
        trim_heap()
    return totals, weighted / size


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
    sys.path.insert(0, str(Path(__file__).parent))
    import _stream_bound
    from _support import QWEN

    from azu.cli import demo
    from azu.registry.sharder import shard_model

    numpy_blas = kernels._blas_product
    packed: dict[tuple[int, tuple[int, ...]], Any] = {}
    use_mlas = [False]

    def product(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if not use_mlas[0] or not MLAS_ROWS[0] <= x.shape[0] <= MLAS_ROWS[1]:
            return numpy_blas(x, block)
        key = (block.data_ptr(), tuple(block.shape))
        if key not in packed:
            packed[key] = mlas_session(block.numpy())
        return mlas_product(packed[key], x)

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        print("[bench] building a Qwen-shaped model...", file=sys.stderr, flush=True)
        src = demo.build_model("qwen2", Path(tmp) / "src", seed=1, **QWEN)
        shard_model(str(src), Path(tmp) / "shards", progress=False)
        prompts = [[1, *[(7 * i + 3 * j) % 300 + 3 for j in range(15)]] for i in range(16)]
        kernels._blas_product = product
        try:
            for i in range(pairs):
                pair = []
                for mlas in (False, True):
                    print(f"[bench] bound, pair {i + 1} of {pairs}, {'MLAS' if mlas else 'as planned'}...",
                          file=sys.stderr, flush=True)
                    use_mlas[0] = mlas
                    packed.clear()
                    pair.append(_stream_bound.measure(Path(tmp) / "shards", 17, 24, prompts,
                                                      kernels="auto").describe())
                    trim_heap()
                out.append((pair[0], pair[1]))
        finally:
            kernels._blas_product = numpy_blas
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="measurements of the products (the median counts)")
    p.add_argument("--head", action="store_true", help="also one product of the Qwen shape's head")
    p.add_argument("--bound", action="store_true", help="also the 16-stream bound, as planned and with MLAS")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of the bound")
    args = p.parse_args()
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        print("this experiment needs ONNX Runtime and onnx: pip install onnxruntime onnx", file=sys.stderr)
        return 1
    torch.set_num_threads(1)  # as a worker runs (OMP_NUM_THREADS=1 in bench/pipeline.py)
    print(f"ONNX Runtime {onnxruntime.__version__}, numpy {np.__version__}, PyTorch {torch.__version__}; "
          "one thread; ms (median of the rounds) and the ratio to MKL as loaded")
    times, per_byte = layer_times(args.rounds)
    print(table("one Qwen-shaped layer's products", times, ROWS))
    print(f"\nRSS the MLAS sessions added: {per_byte:.2f} bytes per byte of their weights")
    print(f"RSS of one session beside its weight (50 sessions of a 896 x 128 weight): "
          f"{session_overhead() / 2**20:.2f} MB")
    if args.head:
        gen = torch.Generator().manual_seed(2)
        head = torch.empty(VOCAB, HIDDEN).uniform_(-0.05, 0.05, generator=gen)
        times, per_byte = product_times([head], ROWS[:5], args.rounds)
        print(table(f"the head ({VOCAB} x {HIDDEN}), one product", times, ROWS[:5]))
        print(f"\nRSS the head's MLAS sessions added: {per_byte:.2f} bytes per byte of its weight")
        del head
        trim_heap()
    if args.bound:
        print("\nthe 16-stream bound (bench/_stream_bound.py, Qwen shape, 17 + 7 layers), alternating "
              "pairs:\n")
        print("| pair | as planned | MLAS for 2-32 rows |\n|---|---|---|")
        for i, (planned, mlas) in enumerate(bound_pairs(args.pairs)):
            print(f"| {i + 1} | {planned} | {mlas} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
