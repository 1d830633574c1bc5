"""Which matrix-multiply kernel a stage's linear layers use on a CPU, chosen by measuring this machine.

On a CPU, PyTorch's ``F.linear`` goes to MKL's sgemm. For the shapes a pipeline stage runs (a few rows
against a large weight: decode steps, micro-batches), oneDNN's inner-product primitive, which PyTorch ships
and its own compiler uses for CPU linears (``torch.ops.mkldnn._linear_pointwise``), is often much faster,
either on the weight as it is or on a weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``). Which one wins, and at how many rows, depends on the CPU.
Milliseconds per product, one thread, fp32, the best of several rounds, running over several weights in turn
as a stage's forward does:

=====================================  =====  ======  ======
machine, shape, rows                    MKL   oneDNN  packed
=====================================  =====  ======  ======
AMD EPYC (AVX2), 4864x896, 1            1.45    0.81    0.56
AMD EPYC (AVX2), 4864x896, 8            2.93    2.14    0.90
AMD EPYC (AVX2), 4864x896, 16           3.82    2.94    1.60
Intel Xeon (AVX-512), 4864x896, 1       1.07    1.12    1.19
Intel Xeon (AVX-512), 4864x896, 8       2.79    1.72    1.70
Intel Xeon (AVX-512), 4864x896, 16      2.61    2.24    2.14
AMD EPYC (AVX-512), 4864x896, 1         0.90    0.72    0.79
AMD EPYC (AVX-512), 4864x896, 8         1.66    1.39    0.85
AMD EPYC (AVX-512), 4864x896, 16        2.20    1.84    1.17
=====================================  =====  ======  ======

On the AVX2 machine the packed layout wins everywhere (and with the weights in memory, not the cache, one
row ran faster padded to four rows: 0.88 ms against 1.17); on the Intel AVX-512 machine MKL wins a single
row, oneDNN on the weight as it is ties the packed layout from 4 rows up, and padding one row to four costs
20%; on the AMD AVX-512 machine one row padded to four runs packed in 0.60-0.66 ms, within 10% of oneDNN's
0.72 in some measurements and 30% under it in others, and packed batches take two thirds of the time.
A choice fixed from either machine costs the other up to 30% of its decode speed at b=1, so a stage does not
fix it: ``measure()`` times the kernels once per process (the processes of a host one at a time), on as many
bytes of weights shaped like the model's layers as the stage holds (16 to 384 MB), for 1-4, 8, 16 and 128 rows
(two to five seconds before a large stage loads), and ``KernelPlan`` takes from that. The weights are a
layer's linears in turn (``layer_shapes``: attention projections and a gated MLP), not the MLP's shape alone:
oneDNN's fixed cost per call weighs on a layer's small projections, and on the Intel Xeon with AVX-512 of
2026-12-01 the MLP shape alone called packing a tie for one row (0.28 ms a product either way) on Petals' test
model (512 wide), whose one-process decode packing made 15% slower (52-56 tok/s against 62-64, alternating
runs); the layer's shapes show it (a layer's products 1.0-1.07 ms packed, 0.87-0.90 MKL).

- per row count, the kernel on the weight as loaded: MKL (what ``generate`` runs), or oneDNN where it is
  clearly faster (10%) for that many rows;
- the layout: as loaded, packed, or transposed (``(in, out)``, run as ``x @ w`` on MKL: on the AMD EPYC
  with AVX2 (Zen 2) of 2026-12-02 one row ran so 15-20% faster than any kernel on the weight as loaded, the
  Qwen head 30%). One user's decode step comes first: the layout that runs a single row fastest, where it
  is clearly faster than the weights as loaded (it copies every weight, in blocks, the original pages handed
  back as it goes, and costs load time, so the copy must gain). Micro-batches (4, 8, 16 rows) get the
  layout that runs them fastest where that is clearly faster: the stage moves its weights to it while
  batches of several jobs last and back after (``LayoutSwitch``) where the first runs a single row clearly
  faster than it, else it is the only layout;
- on the packed layout, how many zero rows to add to 1-3 rows (oneDNN runs 1 or 2 rows on a slower kernel
  on some CPUs);
- on the transposed layout, per row count, MKL or numpy's BLAS (OpenBLAS in PyPI's numpy wheels) where it is
  clearly faster, on the same blocks. On the AMD EPYC with AVX2 (Zen 3) of 2026-12-03, OpenBLAS ran a Qwen
  layer's products for 16 rows in 11.5 ms against 13.9 packed and 16.0 on MKL transposed, 4-8 rows as fast as
  packed, and the head's 8 rows in 75 ms against 90 packed: the transposed layout then serves one user and
  batches alike, without moving the weights between layouts. Its threads are held to PyTorch's
  (``blas_works``);
- MLAS, ONNX Runtime's CPU kernels, on a copy it packs itself (``azu.engine.mlas``), where ONNX Runtime runs:
  on the AMD EPYC with AVX2 (Zen 3) of 2026-12-03, 2-8 rows of a Qwen layer in 40-60% of numpy's BLAS's time,
  one row 10-15% slower, so there it is the batch layout. Its copy cannot be read back: a move off it reads
  the rows from the shard file again (``WeightFiles``, ``LoadedFiles.restore``).

``auto`` does not measure for a stage whose weights are under 64 MB: they stay in the cache, where every
kernel is fast; it runs PyTorch's linear.

The results are the same up to float rounding (relative difference ~1e-7 per product, as between any two
GEMM implementations), so greedy tokens stay those of ``transformers`` and the verifier's tolerance covers
a worker and a verifier that use different kernels.

``AZU_CPU_KERNELS``: ``auto`` measures and chooses for float32 CPU stages; ``packed``, ``transposed``,
``mlas`` and ``plain`` force the layout (the per-row choices are still measured); ``torch`` keeps PyTorch's
own linear everywhere.
Every worker logs the plan it chose and the figures it chose from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from azu.engine.heap import release_freed_memory
from azu.engine.mlas import MlasWeight, mlas_works

log = logging.getLogger(__name__)

KERNELS = ("auto", "packed", "transposed", "mlas", "plain", "torch")
# A stage's float32 weights are held in one of these layouts: as loaded (``(out, in)``, what ``F.linear``
# reads), packed into oneDNN's blocked layout, transposed (``(in, out)``, for ``torch.mm(x, w)``), or packed
# by ONNX Runtime's MLAS (``azu.engine.mlas``; where ONNX Runtime runs, and measured only then).
LAYOUTS = ("loaded", "packed", "transposed", "mlas")

# The row count oneDNN picks its blocked layout for: a layout picked for 16 rows was the fastest or within
# noise of it for every product from 1 to 2048 rows on both machines above.
PACK_FOR_ROWS = 16
# The row counts measured; a product of r rows follows the choice for the smallest of these >= r (or the
# largest). 128 is the default prefill chunk (AZU_PREFILL_CHUNK).
ROW_BUCKETS = (1, 2, 3, 4, 8, 16, 128)
# Up to how many rows a product of 1-3 rows may be padded with zero rows.
PAD_UP_TO = 4
# The row counts a layout is judged on for micro-batches (one decode row is judged alone).
BATCH_ROWS = (4, 8, 16)
# Another kernel than PyTorch's, or the packed layout, is taken where it runs in at most this share of the
# time: run to run, the same product's best time moves by a few percent.
CLEARLY_FASTER = 0.9
# ``measure`` runs products over as many bytes of weights as the stage holds, within these bounds: whether a
# stage's weights stay in the cache between steps changes which kernel wins.
MEASURE_BYTES = (16 << 20, 384 << 20)
# ``auto`` leaves a stage with fewer bytes of weights than this on torch's linear without measuring: its
# weights stay in the cache, and any kernel is fast.
MEASURE_ABOVE_BYTES = 64 << 20
# Rows of a weight packed (and its original pages freed) at a time: at most this many bytes each.
BLOCK_BYTES = 32 << 20
# A stage whose plan has a batch layout (``LayoutSwitch``) moves to it after this many steps in a row of at
# least ``SWITCH_JOBS`` one-token rows each, and back after ``SWITCH_BACK_AFTER_STEPS`` steps in a row of
# fewer; each step then converts about ``SWITCH_BYTES_PER_STEP`` of weights, block by block, so no one step
# stalls for the whole stage's copy (a Qwen-shaped stage's 1.2 GB: about a second).
SWITCH_JOBS = 4
SWITCH_AFTER_STEPS = 8
SWITCH_BACK_AFTER_STEPS = 16
SWITCH_BYTES_PER_STEP = 64 << 20
# An idle worker moves the weights back to one user's layout once the stage has run no step for this long:
# bursts of batches a second or two apart do not move them back and forth (a second of conversion each way).
SWITCH_BACK_IDLE_S = 2.0
# Held by the process measuring (``one_measurement_at_a_time``), in the temp directory: one at a time on a
# host. A process waits at most this long for it (a measurement takes seconds; a holder that hangs or is
# stopped must not hold every other worker's load), then measures unlocked.
MEASURE_LOCK_NAME = "azu-cpu-kernels.lock"
MEASURE_LOCK_WAIT_S = 60.0


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _blas_product(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``x @ block`` on numpy's BLAS (OpenBLAS in PyPI's numpy wheels), ``block`` a transposed layout's
    ``(in, out)`` block: the arrays numpy reads are views of the tensors' memory, and the tensor returned is
    a view of the array numpy wrote (nothing is copied either way)."""
    return torch.from_numpy(np.matmul(x.detach().contiguous().numpy(), block.numpy()))


def bucket(rows: int) -> int:
    """The measured row count a product of ``rows`` rows follows."""
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def _dispatched(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                onednn_rows: frozenset[int]) -> torch.Tensor:
    """``x``'s products with a weight as loaded (``rows`` rows of them), on oneDNN where the plan names it for
    that many rows (``KernelPlan.onednn_rows``), else on MKL (``F.linear``)."""
    if bucket(rows) in onednn_rows:
        return _product(x, weight, bias)
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class KernelPlan:
    """How a stage's float32 linears run on this CPU: the layout (one of ``LAYOUTS``), and per row count the
    kernel."""

    layout: str
    onednn_rows: frozenset[int]  # on the loaded layout, the row buckets oneDNN runs (MKL runs the others)
    pad_to: dict[int, int]  # on the packed layout, rows (1-3) -> the rows run, zero rows added
    # The layout the stage moves its weights to while it runs batches of several jobs step after step, and
    # back from once it does not (``LayoutSwitch``); ``None``: one layout serves both.
    batch_layout: str | None = None
    # On the transposed layout, the row buckets numpy's BLAS runs (MKL runs the others).
    blas_rows: frozenset[int] = frozenset()

    @property
    def rereads_rows(self) -> bool:
        """Whether the stage moves its weights to or from a layout that cannot be read back (MLAS): a move
        off it reads the loaded rows from the shard files again (``WeightFiles``), so they must stay
        readable."""
        return self.batch_layout is not None and not all(
            LAYOUT_MODULES[layout].readable for layout in (self.layout, self.batch_layout))

    def describe(self) -> str:
        text = self._describe(self.layout)
        if self.batch_layout is not None:
            text += f"; under batches of {SWITCH_JOBS}+ jobs: {self._describe(self.batch_layout)}"
        return text

    def _describe(self, layout: str) -> str:
        if layout == "mlas":
            return "packed by ONNX Runtime's MLAS"
        if layout == "packed":
            pads = ", ".join(f"{r}->{p}" for r, p in sorted(self.pad_to.items()) if p != r)
            return f"packed for oneDNN (rows padded: {pads or 'none'})"
        if layout == "transposed":
            if self.blas_rows:
                blas = sorted(self.blas_rows)
                return f"transposed (in x out); numpy's BLAS for {blas} rows, MKL for the rest"
            return "transposed (in x out), MKL"
        on = sorted(self.onednn_rows)
        return f"as loaded; oneDNN for {on} rows, MKL for the rest" if on else "as loaded; MKL"


Timings = dict[tuple[str, int], float]


# A layer's linear weights, ``(out_features, in_features)`` each: what ``measure`` runs products on.
LayerShapes = tuple[tuple[int, int], ...]


def layer_shapes(config: Mapping[str, Any], hidden: int) -> LayerShapes:
    """The linears of one of a model's layers, from its config (``hidden`` wide): the attention's query, key,
    value and output projections (grouped-query key/value heads counted) and a gated MLP (a plain MLP has one
    weight fewer: close enough for choosing a kernel)."""
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    inner = int(config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner")
                or 4 * hidden)
    q = heads * head_dim
    return ((q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inner, hidden), (inner, hidden),
            (hidden, inner))


def block_rows(in_features: int, element_size: int = 4) -> int:
    """How many rows of a weight ``in_features`` wide one block holds (at most ``BLOCK_BYTES``, at least one
    row): how ``apply_plan`` cuts a weight, and how ``stage_shapes`` measures a head."""
    return max(1, BLOCK_BYTES // max(1, in_features * element_size))


def stage_shapes(layer: LayerShapes, layers: int, head: tuple[int, int] | None = None) -> LayerShapes:
    """What one of a stage's ``layers`` layers stands for when measuring (``measure``): its linears
    (``layer_shapes``) and, for a stage whose head runs on the plan (``head``: ``(vocab, hidden)``, not
    tied to embeddings on the same stage), that layer's share of the head, in the blocks ``apply_plan`` cuts
    it into.

    A Qwen-shaped model's head is 544 MB, more than half of a last stage of seven layers, and it takes the
    kernels otherwise than a layer: on the AMD EPYC with AVX-512 of 2026-12-03 one row of it ran 32 ms
    transposed against 37 packed, where a layer's linears ran 3.4 ms transposed against 3.3 packed: measured
    on the layers alone, the stage's plan was made for a stage it is not. (On that machine the whole stage is
    near the plan's 10% bar either way: its one-user layout still differs from run to run.)"""
    if head is None:
        return layer
    vocab, hidden = head
    share = -(-vocab // max(1, layers))  # rows of the head per layer, rounded up
    rows = block_rows(hidden)  # float32, as ``measure`` runs them
    full, rest = divmod(share, rows)
    return (*layer, *((rows, hidden),) * full, *(((rest, hidden),) if rest else ()))


def measure(shapes: LayerShapes, working_bytes: int) -> Timings:
    """Milliseconds per layer's products on this CPU (one product per weight of ``shapes``), the best of
    several rounds, for ``mkl``, ``onednn`` (weight as it is), ``transposed`` (MKL on the weight held
    ``(in, out)``), ``blas`` (numpy's BLAS on that weight, where ``blas_works``), ``packed`` and ``mlas``
    (where ``mlas_works``) at each of ``ROW_BUCKETS`` (and 1-4 rows, for the padding).

    Each round runs the products over ``working_bytes`` of different weights in turn, as a stage's forward
    runs its layers (a stage passes its own size): a single weight that stays in the cache made packing look
    twice as fast at 8-16 rows as it is on a stage's 1.2 GB, and a 96 MB set that fit the AVX-512 machine's
    300 MB cache called packing faster for one row where, on a Qwen stage's 1.2 GB, it is slower (measured).
    The shapes matter too: oneDNN's fixed cost per call is larger than MKL's, which small products feel.
    """
    layer_bytes = sum(out * inp * 4 for out, inp in shapes)
    layers = max(2, working_bytes // layer_bytes)
    gen = torch.Generator().manual_seed(0)
    # (weight, its in_features) in a stage's order, layer after layer.
    weights: list[tuple[Any, int]] = [(torch.empty(out, inp).uniform_(-0.05, 0.05, generator=gen), inp)
               for _ in range(layers) for out, inp in shapes]
    inputs = {rows: {inp: torch.randn(rows, inp, generator=gen) for inp in {inp for _, inp in shapes}}
              for rows in sorted({*ROW_BUCKETS, *range(1, PAD_UP_TO + 1)})}
    times: Timings = {}

    def time_kernels(kernels: dict[str, Callable[[torch.Tensor, Any], object]]) -> None:
        for rows, xs in inputs.items():
            for run in kernels.values():
                for w, inp in weights[: len(shapes)]:
                    run(xs[inp], w)  # a primitive is created on first use
            # A prompt chunk's products are bound by arithmetic, not by reading the weights: one layer does.
            passes = 1 if rows > 16 else layers
            some = weights[: passes * len(shapes)]
            for _ in range(3):  # kernels interleaved: a busy moment hits them alike
                for name, run in kernels.items():
                    start = time.perf_counter()
                    for w, inp in some:
                        run(xs[inp], w)
                    took = (time.perf_counter() - start) / passes * 1e3
                    times[name, rows] = min(took, times.get((name, rows), took))

    with torch.inference_mode():
        time_kernels({"mkl": lambda x, w: F.linear(x, w), "onednn": lambda x, w: _product(x, w, None)})
        # One copy at a time, each replacing the last: about one set of weights is held.
        for i, (w, inp) in enumerate(weights):
            weights[i] = (TransposedLinear.convert(w), inp)
        on_transposed: dict[str, Callable[[torch.Tensor, Any], object]] = {
            "transposed": lambda x, w: torch.mm(x, w)}
        if blas_works():
            on_transposed["blas"] = _blas_product
        time_kernels(on_transposed)
        for i, (w, inp) in enumerate(weights):
            weights[i] = (PackedLinear.convert(w.t()), inp)  # back to (out, in) rows, then packed
        time_kernels({"packed": lambda x, w: _product(x, w, None)})
        if mlas_works():
            for i, (w, inp) in enumerate(weights):
                weights[i] = (MlasWeight(PackedLinear.rows_of(w)), inp)
            time_kernels({"mlas": lambda x, w: w(x)})
    return times


def plan_from(times: Timings, layout: str = "auto") -> KernelPlan:
    """The plan ``times`` (from ``measure``) call for; ``layout`` (``"packed"``, ``"transposed"``,
    ``"mlas"`` or ``"plain"``: as loaded) forces the layout."""
    pad_to = {r: min(range(r, PAD_UP_TO + 1), key=lambda p: times["packed", p]) for r in range(1, PAD_UP_TO)}
    # PyTorch's linear (MKL) is what ``generate`` runs: another kernel takes a row count only where it is
    # clearly faster, not where a noisy measurement put it a hair ahead.
    onednn_rows = frozenset(b for b in ROW_BUCKETS if times["onednn", b] < CLEARLY_FASTER * times["mkl", b])
    blas_rows = frozenset(b for b in ROW_BUCKETS
                          if times.get(("blas", b), math.inf) < CLEARLY_FASTER * times["transposed", b])

    # MLAS where it was measured (ONNX Runtime runs here).
    layouts = tuple(c for c in LAYOUTS if c != "mlas" or ("mlas", 1) in times)

    def ms(layout: str, rows: int) -> float:
        if layout == "mlas":
            return times["mlas", rows]
        if layout == "packed":
            return times["packed", pad_to.get(rows, rows)]
        if layout == "transposed":
            return times["blas" if rows in blas_rows else "transposed", rows]
        return times["onednn" if rows in onednn_rows else "mkl", rows]

    def batches(layout: str) -> float:
        """The micro-batches (4-16 rows) on ``layout``, on average, as a share of the loaded layout's time."""
        return sum(ms(layout, r) / ms("loaded", r) for r in BATCH_ROWS) / len(BATCH_ROWS)

    batch_layout: str | None = None
    if layout == "auto":
        # One user's decode step first: the layout that runs a single row fastest, where it is clearly faster
        # than the weights as loaded (any other copies every weight: it must gain). Batches of several jobs
        # get the layout that runs them fastest, where that is clearly faster than the first: the stage moves
        # to it while batches last (``LayoutSwitch``), so neither a single user nor a full stage pays for the
        # other's layout, where the first runs one row faster than it; else it is the only one.
        fastest = min(layouts, key=lambda c: ms(c, 1))
        chosen = fastest if ms(fastest, 1) < CLEARLY_FASTER * ms("loaded", 1) else "loaded"
        for_batches = min(layouts, key=batches)
        if batches(for_batches) < CLEARLY_FASTER * batches(chosen):
            # One layout for both only where the batches' one runs a single row as fast as the one chosen
            # for it: a single user on a slower layout pays on every step, a burst of batches pays for a move
            # there and one back (seconds of conversion on a large stage, the way back from MLAS reading the
            # rows from the files again). Until 2026-12-03 the batches' layout served one
            # user too wherever no other ran a row clearly (10%) faster; on the AMD EPYC with AVX2 (Zen 3) of
            # that day the measurement at load put MLAS's one row 8-25% behind numpy's BLAS on the transposed
            # weight from one run to the next (3.03-3.38 ms against 2.70-2.81), so a worker's stage served one
            # user on MLAS or not by chance, where a Qwen layer's one-row products ran 21% slower on it (4.36
            # ms against 3.59, over 240 MB of layers, medians of 15). On an Intel Xeon with AMX (2026-12-02),
            # one row 4.37 ms as loaded, 4.00 transposed, 4.8 packed: one user as loaded, batches packed.
            if ms(for_batches, 1) <= ms(chosen, 1):
                chosen = for_batches
            else:
                batch_layout = for_batches
    elif layout not in layouts and layout != "plain":
        log.warning("AZU_CPU_KERNELS=%s: ONNX Runtime's MLAS does not run here; choosing as auto does",
                    layout)
        return plan_from(times)
    else:
        chosen = {"plain": "loaded"}.get(layout, layout)
    return KernelPlan(layout=chosen, onednn_rows=onednn_rows, pad_to=pad_to, batch_layout=batch_layout,
                      blas_rows=blas_rows)


@contextlib.contextmanager
def one_measurement_at_a_time() -> Iterator[None]:
    """Held while this process measures: another worker process of this host that measures meanwhile waits.

    Two workers that load at once measured at once, and each one's products then shared the memory bandwidth
    with the other's: on the AMD EPYC with AVX2 of 2026-12-02 the transposed layout's one row, 15-20% faster
    measured alone, measured a tie, and both workers of a pipeline chose the loaded layout (P1 0.87x the
    plan measured alone). One user's steps, the plan's first concern, run stage after stage, not at once.
    Where the lock cannot be had (no temp directory, another user's file, a file system without locks) or
    is not had within ``MEASURE_LOCK_WAIT_S``, the measurement runs unlocked."""
    fd = _take_measure_lock()
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # and with it the lock


def _take_measure_lock() -> int | None:
    """A descriptor holding the host's measurement lock, or ``None`` (logged) where it cannot be had."""
    try:
        path = os.path.join(tempfile.gettempdir(), MEASURE_LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.info("measuring without the host's lock (%s)", exc)
        return None
    deadline = time.monotonic() + MEASURE_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.warning("another process has held %s for %.0f s; measuring without it", path,
                            MEASURE_LOCK_WAIT_S)
                break
            time.sleep(0.05)
        except OSError as exc:
            log.info("measuring without the host's lock (%s)", exc)
            break
    os.close(fd)
    return None


@functools.cache
def _measured(shapes: LayerShapes, working_bytes: int) -> Timings:
    with one_measurement_at_a_time():
        times = measure(shapes, working_bytes)
    release_freed_memory()  # the measurement's weights, before a stage's arrive
    return times


@functools.cache
def measured_plan(layout: str, shapes: LayerShapes, weight_bytes: int) -> KernelPlan:
    """This process's plan for ``layout`` and a stage of a model whose layers' linears are ``shapes``
    (``layer_shapes``) holding ``weight_bytes``: measured once (``measure``), then kept."""
    low, high = MEASURE_BYTES
    times = _measured(shapes, min(max(weight_bytes, low), high))
    plan = plan_from(times, layout)
    log.info("CPU linears: %s (ms per layer's products %s, rows 1/8/16: MKL %s, oneDNN %s, transposed %s, "
             "transposed on numpy's BLAS %s, packed %s, MLAS %s)", plan.describe(),
             " ".join(f"{o}x{i}" for o, i in shapes),
             *("/".join(f"{times[k, r]:.2f}" if (k, r) in times else "-" for r in (1, 8, 16))
               for k in ("mkl", "onednn", "transposed", "blas", "packed", "mlas")))
    return plan


class WeightFiles(Protocol):
    """Where a stage's weights as loaded live, given back and read again (``LoadedFiles``): what a layout
    that cannot be read back (``MlasLinear``) needs to move off."""

    def release(self, tensor: torch.Tensor) -> int: ...

    def can_restore(self, tensor: torch.Tensor) -> bool: ...

    def restore(self, tensor: torch.Tensor) -> None: ...


class BlockedLinear(nn.Module):
    """A linear layer whose weight is held in another layout than as loaded, in blocks of output rows (each
    block's original pages were given back as it was copied: ``apply_plan``).

    It has no ``weight`` parameter any more: code that would read it fails loudly instead of reading freed
    pages. Each block may keep its *origin*: the view of the loaded file's bytes it came from (pages given
    back, restorable: ``WeightFiles``), for a move off a layout whose blocks cannot be read back."""

    def __init__(self, blocks: list[Any], biases: list[torch.Tensor | None], in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.blocks = blocks  # not parameters (no state dict, no autograd)
        self.biases = biases
        self.origins: list[torch.Tensor | None] = [None] * len(blocks)
        self.in_features = in_features
        self.out_features = out_features

    # Whether ``convert`` copies (the block's original rows can then be given back) or keeps a view.
    copies = True
    # Whether ``rows_of`` can give a block's rows back (else they come from its origin, read again).
    readable = True

    @staticmethod
    def convert(rows: torch.Tensor) -> torch.Tensor:
        """A block of the weight as loaded (``(out, in)`` rows), in this layout."""
        raise NotImplementedError

    @staticmethod
    def rows_of(block: torch.Tensor) -> torch.Tensor:
        """One of this layout's blocks as the weight as loaded (``(out, in)`` rows; a view where it can be):
        ``convert``'s inverse, exact."""
        raise NotImplementedError

    @staticmethod
    def out_rows(block: torch.Tensor) -> int:
        """How many of the weight's output rows one of this layout's blocks holds."""
        return int(block.shape[0])

    def _block(self, x: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x``'s products with one block (``x`` two-dimensional)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._products(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def _products(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self._block(x, self.blocks[0], self.biases[0])
        # Into one output, block by block: not the blocks' outputs and their concatenation at once (a
        # verifier's 2048-position prefill through a Qwen head would hold 1.2 GB of logits twice).
        out = x.new_empty(x.shape[0], self.out_features)
        first = 0
        for w, b in zip(self.blocks, self.biases, strict=True):
            part = self._block(x, w, b)
            out[:, first:first + part.shape[-1]] = part
            first += part.shape[-1]
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={len(self.blocks)}"


class PackedLinear(BlockedLinear):
    """A linear layer whose weight is held in oneDNN's blocked layout (``_reorder_linear_weight``)."""

    def __init__(self, blocks: list[torch.Tensor], biases: list[torch.Tensor | None], in_features: int,
                 out_features: int, pad_to: dict[int, int] | None = None) -> None:
        super().__init__(blocks, biases, in_features, out_features)
        self.pad_to = pad_to or {}

    @staticmethod
    def convert(rows: torch.Tensor) -> torch.Tensor:
        # oneDNN's reorder reads a strided view as it is (a transposed block's rows: no contiguous copy first;
        # 9.4 ms against 12.3 for a 4864 x 896 weight on the Xeon of 2026-12-02, the same bytes out).
        return torch.ops.mkldnn._reorder_linear_weight(rows, PACK_FOR_ROWS)

    @staticmethod
    def rows_of(block: torch.Tensor) -> torch.Tensor:
        return block.to_dense()

    def _block(self, x: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _product(x, block, bias)

    def _products(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        run = self.pad_to.get(rows, rows)
        if run > rows:
            # Zero rows, where this CPU runs more rows faster (measured: KernelPlan); each real row's result
            # does not depend on the other rows.
            padded = x.new_zeros(run, self.in_features)
            padded[:rows] = x
            return super()._products(padded)[:rows]
        return super()._products(x)


class TransposedLinear(BlockedLinear):
    """A linear layer whose weight is held transposed, ``(in, out)``, and run as ``x @ w``: for few rows some
    CPUs' MKL runs that faster than ``F.linear``'s ``x @ w.T`` on the weight as loaded (AMD EPYC with AVX2,
    2026-12-02, one row: a Qwen layer's linears 3.2 ms against 3.9-4.0, its 151936-word head 23 ms against
    33-40). The row counts the plan names (``KernelPlan.blas_rows``) run on numpy's BLAS instead, the same
    blocks read in place."""

    def __init__(self, blocks: list[torch.Tensor], biases: list[torch.Tensor | None], in_features: int,
                 out_features: int, blas_rows: frozenset[int] = frozenset()) -> None:
        super().__init__(blocks, biases, in_features, out_features)
        self.blas_rows = blas_rows

    @staticmethod
    def convert(rows: torch.Tensor) -> torch.Tensor:
        return rows.t().contiguous()

    @staticmethod
    def rows_of(block: torch.Tensor) -> torch.Tensor:
        return block.t()

    @staticmethod
    def out_rows(block: torch.Tensor) -> int:
        return int(block.shape[1])

    def _block(self, x: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.blas_rows and bucket(x.shape[0]) in self.blas_rows:
            out = _blas_product(x, block)
            return out if bias is None else out.add_(bias)
        return torch.mm(x, block) if bias is None else torch.addmm(bias, x, block)


class RowsLinear(BlockedLinear):
    """The weight as loaded (``(out, in)`` rows), in blocks that are views of it, so that a ``LayoutSwitch``
    can move it to another layout and back block by block; each product runs on MKL or oneDNN as
    ``DispatchLinear`` does."""

    copies = False

    def __init__(self, blocks: list[torch.Tensor], biases: list[torch.Tensor | None], in_features: int,
                 out_features: int, onednn_rows: frozenset[int]) -> None:
        super().__init__(blocks, biases, in_features, out_features)
        self.onednn_rows = onednn_rows

    @staticmethod
    def convert(rows: torch.Tensor) -> torch.Tensor:
        return rows.contiguous()  # a view where the rows are contiguous already (a block of a loaded weight)

    @staticmethod
    def rows_of(block: torch.Tensor) -> torch.Tensor:
        return block

    def _block(self, x: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _dispatched(x, block, bias, x.shape[0], self.onednn_rows)


class MlasLinear(BlockedLinear):
    """A linear layer whose blocks are packed by ONNX Runtime's MLAS (``MlasWeight``): on the AMD EPYC with
    AVX2 (Zen 3) of 2026-12-03, a Qwen layer's products for 2-16 rows in 34-50% less time than numpy's BLAS.
    Its blocks cannot be read back: a move off it reads each block's rows from its origin in the files."""

    readable = False

    @staticmethod
    def convert(rows: torch.Tensor) -> MlasWeight:  # type: ignore[override]
        return MlasWeight(rows)

    @staticmethod
    def rows_of(block: torch.Tensor) -> torch.Tensor:
        raise TypeError("MLAS's packed weights cannot be read back: restore the block's origin instead")

    @staticmethod
    def out_rows(block: MlasWeight) -> int:  # type: ignore[override]
        return block.out_rows

    def _block(self, x: torch.Tensor, block: MlasWeight, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        out = block(x)
        return out if bias is None else out.add_(bias)


# The blocked module holding each layout.
LAYOUT_MODULES: dict[str, type[BlockedLinear]] = {
    "loaded": RowsLinear, "packed": PackedLinear, "transposed": TransposedLinear, "mlas": MlasLinear}


def _layout_of(module: BlockedLinear) -> str:
    return next(name for name, kind in LAYOUT_MODULES.items() if type(module) is kind)


def _assembled(layout: str, blocks: list[Any], biases: list[torch.Tensor | None], in_features: int,
               out_features: int, plan: KernelPlan,
               origins: list[torch.Tensor | None] | None = None) -> BlockedLinear:
    module: BlockedLinear
    if layout == "packed":
        module = PackedLinear(blocks, biases, in_features, out_features, plan.pad_to)
    elif layout == "transposed":
        module = TransposedLinear(blocks, biases, in_features, out_features, plan.blas_rows)
    elif layout == "mlas":
        module = MlasLinear(blocks, biases, in_features, out_features)
    else:
        module = RowsLinear(blocks, biases, in_features, out_features, plan.onednn_rows)
    if origins is not None:
        module.origins = origins
    return module


class MovingLinear(nn.Module):
    """A linear part-way from one layout to another (``LayoutSwitch``): its first output rows' blocks in one
    layout (``first``), the others in the other (``rest``). Blocks move one at a time at the boundary, so the
    rows keep their order whichever way they go."""

    def __init__(self, first: BlockedLinear, rest: BlockedLinear) -> None:
        super().__init__()
        self.first, self.rest = first, rest
        self.in_features = first.in_features

    @property
    def out_features(self) -> int:
        return self.first.out_features + self.rest.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = flat.new_empty(flat.shape[0], self.out_features)
        out[:, :self.first.out_features] = self.first._products(flat)
        out[:, self.first.out_features:] = self.rest._products(flat)
        return out.reshape(*x.shape[:-1], self.out_features)


class LayoutSwitch:
    """Moves a stage's blocked linears between its plan's layout, for one user's steps, and its batch layout,
    for batches of several jobs, as the load comes and goes (``KernelPlan.batch_layout``).

    On some CPUs no layout is best at both: on the Intel Xeon with AVX-512 and AMX of 2026-12-02, a Qwen
    layer's products for one row took 3.6-3.9 ms transposed, 4.0-4.2 as loaded, 4.6-4.8 packed; for eight rows
    5.8-6.1 packed, 7.2-7.6 as loaded (oneDNN), 8.9-9.4 transposed. The stage calls :meth:`after_step` with
    each step's count of one-token rows (a prompt's chunks count neither way: a long prompt does not move
    them): after ``SWITCH_AFTER_STEPS`` steps in a row of ``SWITCH_JOBS`` or more the weights move to the
    batch layout, after ``SWITCH_BACK_AFTER_STEPS`` of fewer they move back, and a worker with nothing to run
    moves them back too once no step has come for ``SWITCH_BACK_IDLE_S`` (:meth:`move_when_idle`), so the next
    lone user finds them ready. A move goes block by block (at most ``BLOCK_BYTES``; each old block dropped,
    or given to ``release``, as its new one exists: one block more than the weights at the peak), about
    ``SWITCH_BYTES_PER_STEP`` a step, so no step stalls for the whole stage. A linear part-way runs each block
    on the layout it is in (``MovingLinear``): the products agree up to float rounding, and ``rows_of`` gives
    the loaded rows back bit for bit, so moves never drift.
    """

    def __init__(self, model: nn.Module, plan: KernelPlan, release: Callable[[torch.Tensor], object],
                 files: WeightFiles | None = None) -> None:
        assert plan.batch_layout is not None
        self.plan = plan
        self.release = release
        self.files = files  # restores the origins of blocks a move takes off a layout that cannot be read
        self.layout = plan.layout  # where the weights are going (or are)
        self.switches = 0
        self._places = _places(model, lambda child: isinstance(child, BlockedLinear))
        self._todo: list[tuple[nn.Module, str]] = []
        self._run = 0  # steps in a row that asked for the other layout
        # This move's bytes, seconds converting and turns (steps or idle moves), for its log line.
        self._moved_bytes, self._moved_s, self._turns = 0, 0.0, 0
        self.finished_idle = False
        self._last_step = 0.0  # monotonic time of the last step counted

    @property
    def settled(self) -> bool:
        """Whether every weight is in ``layout``."""
        return not self._todo

    def after_step(self, jobs: int) -> None:
        """Count a step of ``jobs`` jobs' rows, and move the next blocks if a move is under way."""
        self._last_step = time.monotonic()
        if self.plan.batch_layout is None:  # a move failed: no more moves
            return
        heavy = jobs >= SWITCH_JOBS
        wanted = self.plan.batch_layout if heavy else self.plan.layout
        if wanted == self.layout:
            self._run = 0
        else:
            self._run += 1
            if self._run >= (SWITCH_AFTER_STEPS if heavy else SWITCH_BACK_AFTER_STEPS):
                assert wanted is not None
                self._head_for(wanted, f"{jobs} jobs a step")
        if self._todo:
            self._move(SWITCH_BYTES_PER_STEP)

    def move_when_idle(self) -> bool:
        """With nothing to run: move the next blocks back to the plan's layout (one user's), if they are not
        there; whether blocks are still to move. ``finished_idle`` says whether this call ended a move: the
        caller may then trim the heap (``release_freed_memory``: the other layout's blocks were freed as the
        new ones were made), outside any lock (a trim walks the whole heap, tens to hundreds of ms)."""
        self.finished_idle = False
        if time.monotonic() - self._last_step < SWITCH_BACK_IDLE_S:
            return False  # not yet: the session's next idle wait comes back here
        if self.layout != self.plan.layout:
            self._head_for(self.plan.layout, "idle")
        if self._todo:
            self._move(SWITCH_BYTES_PER_STEP)
            self.finished_idle = not self._todo
        return bool(self._todo)

    def move_all(self, layout: str) -> bool:
        """Move every weight to ``layout`` (one of the plan's two) now, whatever the steps so far: for a
        measurement of a layout's steady state (bench/_stream_bound.py) and for tests. Whether they all are
        there: not after a failed move (logged; every linear whole where it stands), nor where a block has
        no way back from it (``_move_block``: it stays)."""
        assert layout in (self.plan.layout, self.plan.batch_layout)
        if layout != self.layout:
            self._head_for(layout, "asked")
        while self._todo:
            self._move(SWITCH_BYTES_PER_STEP)
        return self.layout == layout and all(
            not isinstance(module := getattr(parent, name), MovingLinear) and _layout_of(module) == layout
            for parent, name in self._places)

    def _head_for(self, layout: str, why: str) -> None:
        self.layout, self._run, self.switches = layout, 0, self.switches + 1
        self._todo = list(self._places)
        self._moved_bytes, self._moved_s, self._turns = 0, 0.0, 0
        log.info("CPU linears (%s): moving the weights to %s", why, self.plan._describe(layout))

    def _move(self, budget: int) -> None:
        started = time.perf_counter()
        self._turns += 1
        while self._todo and budget > 0:
            parent, name = self._todo[0]
            try:
                step = self._move_block(parent, name)
                if step is None:  # it cannot move (below): it stays where it is
                    self._todo.pop(0)
                    continue
            except Exception as exc:  # a move must never fail the step it follows
                # Out of memory for one more block, most likely. Every linear is whole where it stands (a
                # block moves only once its copy exists) and runs as it is; this stage moves no more.
                log.warning("CPU linears: moving the weights to %s failed (%s); they stay as they are",
                            self.layout, exc)
                self._todo, self.plan = [], dataclasses.replace(self.plan, batch_layout=None)
                self.layout = self.plan.layout
                return
            budget -= step
            self._moved_bytes += step
            module = getattr(parent, name)
            if not isinstance(module, MovingLinear) and _layout_of(module) == self.layout:
                self._todo.pop(0)
        if not LAYOUT_MODULES[self.layout].readable:
            # ONNX Runtime copies each weight into a buffer of its own, packs it and frees the copy; glibc
            # keeps the freed copies in the heap, not reusing them for the next: without a trim a turn, a move
            # to MLAS held twice the weights moved (33 MB of RSS for a 17 MB block), and on the AMD EPYC of
            # 2026-12-03 each session then took 150-190 ms to start instead of 35-46 (7 ms a trim).
            release_freed_memory()
        self._moved_s += time.perf_counter() - started
        if not self._todo:
            log.info("CPU linears: the weights are %s: %.0f MB moved in %.2f s of conversion over %d turns",
                     self.layout, self._moved_bytes / 2**20, self._moved_s, self._turns)

    def _move_block(self, parent: nn.Module, name: str) -> int | None:
        """Move one block of ``parent.name`` to ``layout``: the bytes moved, 0 if it is all there, ``None`` if
        it cannot move (a layout either way that cannot be read back, and a block whose rows the files cannot
        give again: it would have no way back)."""
        module = getattr(parent, name)
        if isinstance(module, MovingLinear):
            first, rest = module.first, module.rest
        elif _layout_of(module) == self.layout:
            return 0
        else:
            target_kind = LAYOUT_MODULES[self.layout]
            if (not (module.readable and target_kind.readable)
                    and (self.files is None or any(o is None for o in module.origins))):
                return None
            first, rest = _assembled(self.layout, [], [], module.in_features, 0, self.plan, []), module
        # The blocks at the boundary move: the first of ``rest`` to the end of ``first``, or back.
        if _layout_of(first) == self.layout:
            source, target, take, put = rest, first, 0, len(first.blocks)
        else:
            source, target, take, put = first, rest, len(first.blocks) - 1, 0
        old, new = type(source), type(target)
        block, origin = source.blocks[take], source.origins[take]
        with torch.inference_mode():  # first: if it fails, nothing has changed
            if old.readable:
                rows = old.rows_of(block)
            else:
                assert self.files is not None and origin is not None  # checked before it came here
                self.files.restore(origin)  # read from the file again, checked: a mismatch fails the move
                rows = origin
            try:
                converted = new.convert(rows)
            except BaseException:
                if not old.readable and origin is not None:
                    self.release(origin)  # read again for nothing: its pages go back
                raise
        source.blocks.pop(take)
        source.origins.pop(take)
        target.blocks.insert(put, converted)
        target.origins.insert(put, origin)
        target.biases.insert(put, source.biases.pop(take))
        out_rows = old.out_rows(block)
        source.out_features -= out_rows
        target.out_features += out_rows
        setattr(parent, name, target if not source.blocks else MovingLinear(first, rest))
        # The rows read were a view of the loaded file (the block as loaded, or its origin read again), read
        # by nothing now if the new block is a copy: their pages can go back.
        read_view = block if not old.copies else origin if not old.readable else None
        if new.copies and read_view is not None:
            self.release(read_view)
        return out_rows * module.in_features * 4


class DispatchLinear(nn.Linear):
    """An ``nn.Linear`` on its weight as loaded that runs each product on MKL or oneDNN, whichever this CPU
    runs faster for that many rows (``KernelPlan.onednn_rows``); also a packed stage's linears whose weight
    another module reads (a head tied to the embeddings on the same stage)."""

    onednn_rows: frozenset[int] = frozenset(ROW_BUCKETS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dispatched(x, self.weight, self.bias, x.numel() // self.in_features, self.onednn_rows)


@functools.cache
def onednn_works() -> bool:
    """Whether this PyTorch packs and runs oneDNN linears and they give ``F.linear``'s result."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2, 64, generator=gen)
        w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
        got = _product(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_FOR_ROWS), b)
    except (AttributeError, RuntimeError) as exc:
        log.info("oneDNN linear unavailable (%s); using torch's", exc)
        return False
    return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4))


@functools.cache
def blas_works() -> bool:
    """Whether numpy's BLAS can run a transposed layout's products: its threads held to PyTorch's count (a
    worker that runs one thread must not have a BLAS spread over every core, spinning beside the other
    workers), and its result ``F.linear``'s."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    threads = torch.get_num_threads()
    try:
        controller = ThreadpoolController()
        controller.limit(limits=threads, user_api="blas")
        # A threadpoolctl that does not know numpy's BLAS (before 3.5: PyPI's numpy 2 carries OpenBLAS as
        # scipy_openblas) limits nothing and says nothing: the limit must be seen to hold.
        held = [lib["num_threads"] for lib in controller.info() if lib["user_api"] == "blas"]
        if not held or any(n != threads for n in held):
            log.info("numpy's BLAS left out of the CPU linears: its threads (%s) are not held to PyTorch's "
                     "(%d)", held or "not found", threads)
            return False
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 64, generator=gen), torch.randn(96, 64, generator=gen)
        got = _blas_product(x, TransposedLinear.convert(w))
    except (AttributeError, OSError, RuntimeError, TypeError, ValueError) as exc:
        log.info("numpy's BLAS unavailable for CPU linears (%s)", exc)
        return False
    return bool(torch.allclose(got, F.linear(x, w), rtol=1e-4, atol=1e-4))


def plan_for(kernels: str, device: torch.device, dtype: torch.dtype, weight_bytes: int,
             shapes: LayerShapes) -> KernelPlan | None:
    """The plan a stage on ``device`` in ``dtype`` holding ``weight_bytes`` of weights of a model whose
    layers' linears are ``shapes`` runs its linears by, given the ``kernels`` choice (one of ``KERNELS``);
    ``None``: PyTorch's own linear."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; use one of {', '.join(KERNELS)}")
    if kernels == "torch" or device.type != "cpu":
        return None
    if kernels == "auto" and weight_bytes < MEASURE_ABOVE_BYTES:
        return None
    if dtype != torch.float32:
        return None  # bfloat16/float16 on a CPU: not measured, left on torch's path
    return measured_plan(kernels, shapes, weight_bytes) if onednn_works() else None


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``t`` can touch, from its first element to its last (a strided view's gaps included)."""
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def apply_plan(model: nn.Module, plan: KernelPlan, release: Callable[[torch.Tensor], object],
               files: WeightFiles | None = None) -> int:
    """Run ``model``'s plain float32 ``nn.Linear`` modules whose weight is loaded as ``plan`` says; how many
    were converted to the plan's layout (packed or transposed, or as loaded in blocks where the plan has a
    batch layout to move to: ``BlockedLinear``). Each weight is copied in
    blocks of rows; ``release(t)`` is called with each block of original weight rows once its copy exists;
    it may hand those rows' pages back to the OS. With ``files``, each block keeps the rows it came from as
    its origin where ``files`` can read them again (``BlockedLinear``; the plan has a layout that cannot be
    read back, and a move off it needs them).

    A weight another tensor of the model shares memory with (a head tied to the embeddings on one stage), or
    a linear module the model holds in two places, is not converted: its pages are still read. It runs as
    loaded (``DispatchLinear``). A strided weight (a view into a fused tensor) stays on torch's linear:
    converting would keep two copies, since only whole tensors' pages can be given back.
    """
    slots, owners, ranges = _census(model)

    def shared(weight: torch.Tensor) -> bool:
        if owners.get(id(weight), 0) > 1:
            return True
        start, end = ranges[id(weight)]
        return any(s < end and start < e for key, (s, e) in ranges.items() if key != id(weight))

    # Places, not modules: a list of the modules themselves would keep every original weight alive until the
    # last is converted (two copies of a stage at the peak, where its weights are not views of the file
    # buffers whose pages ``release`` gives back: a float32 stage cast from bfloat16 files).
    converted = 0
    for parent, name in _places(model, lambda child: type(child) is nn.Linear):
        module = getattr(parent, name)
        weight = module.weight
        if (weight.is_meta or weight.dtype != torch.float32 or not weight.numel()
                or not weight.is_contiguous()):
            continue
        as_is = plan.layout == "loaded" and plan.batch_layout is None  # nothing to copy, now or later
        if as_is or slots[id(module)] > 1 or shared(weight):
            module.__class__ = DispatchLinear
            module.onednn_rows = plan.onednn_rows
            continue
        del weight
        setattr(parent, name, _blocked(module, plan, release, files))
        del module  # the original's last reference: its weight goes before the next one is copied
        converted += 1
    return converted


def _places(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str]]:
    """The (parent, name) places of ``model``'s modules that are ``wanted``: places, not the modules, so a
    caller that replaces them keeps no replaced module alive."""
    return [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if wanted(child)]


def _census(model: nn.Module) -> tuple[dict[int, int], dict[int, int], dict[int, tuple[int, int]]]:
    """By ``id``: how many (parent, name) places hold each module; how many module slots hold each tensor
    (2 or more: tied); the bytes each tensor can touch. Ids only: no module or tensor is kept alive."""
    slots: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        slots[id(module)] = slots.get(id(module), 0) + 1
    owners: dict[int, int] = {}
    ranges: dict[int, tuple[int, int]] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and not t.is_meta and t.numel():
                owners[id(t)] = owners.get(id(t), 0) + 1
                ranges[id(t)] = _byte_range(t)
    return slots, owners, ranges


def _blocked(module: nn.Linear, plan: KernelPlan, release: Callable[[torch.Tensor], object],
             files: WeightFiles | None = None) -> BlockedLinear:
    """``module``'s weight in ``plan``'s layout, copied in blocks of rows of at most ``BLOCK_BYTES``; each
    block of original rows goes to ``release`` once its copy exists (and is its origin, where ``files`` can
    read it again)."""
    weight, bias = module.weight, module.bias
    kind = LAYOUT_MODULES[plan.layout]
    rows = block_rows(weight.shape[1], weight.element_size())
    blocks: list[Any] = []
    biases: list[torch.Tensor | None] = []
    origins: list[torch.Tensor | None] = []
    with torch.inference_mode():
        for first in range(0, weight.shape[0], rows):
            part = weight[first:first + rows]
            blocks.append(kind.convert(part))
            biases.append(None if bias is None else bias[first:first + rows].clone())
            origins.append(part if files is not None and files.can_restore(part) else None)
            if kind.copies:
                release(part)
    return _assembled(plan.layout, blocks, biases, module.in_features, module.out_features, plan, origins)
