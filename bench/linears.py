"""The CPU linears' kernels and layouts on this machine, side by side, and the plan a stage would take.

    python bench/linears.py [--model qwen|petals] [--megabytes 384] [--rounds 3]

One run, one table: the milliseconds of one layer's products (``azu.engine.kernels.measure``: a layer's
linears in turn over as many bytes of weights as ``--megabytes``, one thread, the best of its rounds) for
1, 2, 4, 8, 16 and 128 rows, in each layout and kernel:

- MKL on the weight as loaded (``F.linear``: what ``generate`` runs);
- oneDNN on the weight as loaded;
- oneDNN on the weight packed into its blocked layout (1-3 rows as they are: the plan may pad them);
- MKL on the weight held transposed (``x @ w``);
- numpy's BLAS (OpenBLAS in PyPI's wheels) on that transposed weight, where it runs here;

each also as a ratio to MKL as loaded; then the plan ``auto`` takes from these figures (``KernelPlan``).
With ``--head``, one product of the model's head (vocab x hidden, in the 32 MB blocks a stage holds it in),
the same ways; with ``--last-stage N``, each layer's products with its share of the head, as a last stage of N
layers measures them (``kernels.stage_shapes``). With ``--moves``, what moving the weights between two
layouts costs (``LayoutSwitch``: each block converted as ``_move_block`` converts it), in ms per layer and
MB/s. ``--rounds`` measures that many times and prints the spread
(the figures move by a few percent from run to run; on a machine shared with other work, more).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _support import row_blocks

from azu.engine import kernels

MODELS = {
    # Qwen2.5-0.5B's shape, as bench/pipeline.py's P1 and P3 rows; Petals' test model, as its Petals row.
    "qwen": ({"num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864}, 896, 151936),
    "petals": ({"num_attention_heads": 8, "intermediate_size": 1376}, 512, 32000),
}
ROWS = (1, 2, 4, 8, 16, 128)
KINDS = (("mkl", "MKL as loaded"), ("onednn", "oneDNN as loaded"), ("packed", "oneDNN packed"),
         ("transposed", "MKL transposed"), ("blas", "numpy BLAS transposed"))


def head_times(vocab: int, hidden: int, rows: tuple[int, ...]) -> dict[tuple[str, int], float]:
    """Milliseconds of one product of a ``vocab x hidden`` head, in 32 MB row blocks, per kind and rows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(vocab, hidden).uniform_(-0.05, 0.05, generator=gen)
    blocks = row_blocks(weight)
    times: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        ways = {
            "mkl": lambda x: F.linear(x, weight),
            "onednn": lambda x: [kernels._product(x, b, None) for b in blocks],
        }
        transposed = [kernels.TransposedLinear.convert(b) for b in blocks]
        ways["transposed"] = lambda x: [torch.mm(x, b) for b in transposed]
        if kernels.blas_works():
            ways["blas"] = lambda x: [kernels._blas_product(x, b) for b in transposed]
        packed = [kernels.PackedLinear.convert(b) for b in blocks]
        ways["packed"] = lambda x: [kernels._product(x, b, None) for b in packed]
        for r in rows:
            x = torch.randn(r, hidden, generator=gen)
            for _ in range(3):
                for kind, run in ways.items():
                    start = time.perf_counter()
                    run(x)
                    took = (time.perf_counter() - start) * 1e3
                    times[kind, r] = min(took, times.get((kind, r), took))
    return times


# The moves a LayoutSwitch makes: to the batch layout (packed on the CPUs seen so far) and back.
MOVES = (("loaded", "packed"), ("packed", "loaded"), ("transposed", "packed"), ("packed", "transposed"))


def move_times(shapes: list[tuple[int, int]], megabytes: int) -> dict[tuple[str, str], float]:
    """Milliseconds to move one layer's weights (``shapes``, in the 32 MB blocks a stage holds) from one
    layout to another, the best of three moves over ``megabytes`` of weights (a layer's worth each, in
    turn, as a move walks the stage). Every layout's blocks are made before the timing starts; the copies
    each move makes are new memory, as in a stage."""
    gen = torch.Generator().manual_seed(0)
    layer_bytes = sum(o * i * 4 for o, i in shapes)
    layers = max(1, (megabytes << 20) // layer_bytes)
    loaded = [[block for o, i in shapes
               for block in row_blocks(torch.empty(o, i).uniform_(-0.05, 0.05, generator=gen))]
              for _ in range(layers)]
    held = {"loaded": loaded}
    with torch.inference_mode():
        for layout in ("transposed", "packed"):
            held[layout] = [[kernels.LAYOUT_MODULES[layout].convert(b) for b in layer] for layer in loaded]
        times: dict[tuple[str, str], float] = {}
        for source, target in MOVES:
            old, new = kernels.LAYOUT_MODULES[source], kernels.LAYOUT_MODULES[target]
            for _ in range(3):
                start = time.perf_counter()
                for layer in held[source]:
                    for block in layer:
                        new.convert(old.rows_of(block))
                took = (time.perf_counter() - start) * 1e3 / layers
                times[source, target] = min(took, times.get((source, target), took))
    return times


def moves_table(runs: list[dict[tuple[str, str], float]], layer_mb: float) -> str:
    lines = ["\nmoving a layer's weights between layouts (ms per layer: median of the runs, spread; MB/s)\n",
             "| move | ms per layer | MB/s |", "|---|---|---|"]
    for move in MOVES:
        figures = [run[move] for run in runs]
        mid = statistics.median(figures)
        spread = f" ({min(figures):.1f}-{max(figures):.1f})" if len(figures) > 1 else ""
        lines.append(f"| {move[0]} -> {move[1]} | {mid:.1f}{spread} | {layer_mb / mid * 1e3:.0f} |")
    return "\n".join(lines)


def table(title: str, runs: list[dict[tuple[str, int], float]], rows: tuple[int, ...]) -> str:
    """Rows x kinds: the median over the runs (and the spread), and the ratio to MKL as loaded."""
    kinds = [(kind, name) for kind, name in KINDS if all((kind, r) in run for run in runs for r in rows)]
    lines = [f"\n{title}\n", "| rows | " + " | ".join(name for _, name in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for r in rows:
        cells = []
        base = statistics.median(run["mkl", r] for run in runs)
        for kind, _ in kinds:
            figures = [run[kind, r] for run in runs]
            mid = statistics.median(figures)
            spread = f" ({min(figures):.2f}-{max(figures):.2f})" if len(figures) > 1 else ""
            cells.append(f"{mid:.2f}{spread}, {mid / base:.2f}x")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen")
    p.add_argument("--megabytes", type=int, default=384, help="bytes of weights the products run over")
    p.add_argument("--rounds", type=int, default=3, help="measurements, each its own best of three")
    p.add_argument("--head", action="store_true", help="also one product of the model's head")
    p.add_argument("--moves", action="store_true",
                   help="also what moving the weights between layouts costs (ms per layer, MB/s)")
    p.add_argument("--last-stage", type=int, metavar="LAYERS",
                   help="measure as a last stage of LAYERS layers and the head measures (each layer with its "
                        "share of the head: kernels.stage_shapes)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as a worker runs (OMP_NUM_THREADS=1 in bench/pipeline.py)
    if not kernels.onednn_works():
        print("this PyTorch has no oneDNN linear: stages run PyTorch's own", file=sys.stderr)
        return 1
    config, hidden, vocab = MODELS[args.model]
    shapes = kernels.layer_shapes(config, hidden)
    what = "layer's products"
    if args.last_stage:
        shapes = kernels.stage_shapes(shapes, args.last_stage, (vocab, hidden))
        what = f"layer's products and its share of the head (a last stage of {args.last_stage} layers)"
    runs = []
    for i in range(args.rounds):
        print(f"[bench] measuring, round {i + 1} of {args.rounds}...", file=sys.stderr, flush=True)
        runs.append(kernels.measure(shapes, args.megabytes << 20))
    print(f"CPU linears, {args.model} shape ({' '.join(f'{o}x{i}' for o, i in shapes)}), one thread, "
          f"{args.megabytes} MB of weights, ms per {what} (median of {args.rounds} runs, spread), "
          "and the ratio to MKL as loaded:")
    print(table(f"one {what}", runs, ROWS))
    plans = [kernels.plan_from(run).describe() for run in runs]
    print(f"\nplan (auto) from each run: {'; '.join(plans)}")
    if args.head:
        heads = [head_times(vocab, hidden, ROWS[:4]) for _ in range(args.rounds)]
        print(table(f"the head ({vocab} x {hidden}), ms per product", heads, ROWS[:4]))
    if args.moves:
        moves = [move_times(list(shapes), args.megabytes) for _ in range(args.rounds)]
        print(moves_table(moves, sum(o * i * 4 for o, i in shapes) / 2**20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
