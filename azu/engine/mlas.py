"""ONNX Runtime's MLAS as a layout of a CPU stage's linear weights: each block packed once by MLAS, run there.

MLAS, the CPU kernels under ONNX Runtime, runs a product with a weight it packed itself (a ``MatMul`` or
``Gemm`` whose weight is a constant: ONNX Runtime packs it when the session starts) faster than numpy's BLAS
or MKL for a few rows on some CPUs. On the AMD EPYC with AVX2 (Zen 3) of 2026-12-03 a Qwen layer's products
took 3.75 / 4.89 / 6.46 / 7.66 ms for 2 / 4 / 8 / 16 rows against 7.44 / 7.54 / 9.82 / 11.56 on numpy's BLAS
with the weight transposed, and one row 3.13 against 2.93 (``bench/mlas.py`` has the figures). The same
kernel on a weight it has not packed (a graph input) took 12-18 ms: the packing is the gain.

The packed copy is ONNX Runtime's and cannot be read back, so a block on this layout keeps no rows: a stage
that moves its weights off it again re-reads them from the shard files (``LoadedFiles.restore``), checked
against a digest taken when they were given back (``azu.engine.kernels.LayoutSwitch``).

The weight reaches ONNX Runtime as an in-memory "external data file": ONNX Runtime copies it into a buffer of
its own and frees that once packed (a weight embedded in the model's bytes stayed beside its packed copy);
with the memory arena off, the RSS a session adds is its packed weight (1.00-1.01x the bytes, measured) and
0.07 MB. Each session runs on one thread: a session with more would hold a thread pool of its own, and a
stage holds hundreds of sessions (a block each). A stage whose PyTorch runs several threads measures MLAS on
the one it has, and chooses it only where it is faster so.

The graph is built here from ONNX's protobuf classes; no model file is ever read (nothing to trust).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# ONNX's IR and operator set the one-node graphs are written in (ONNX Runtime 1.17 on reads both).
IR_VERSION = 9
OPSET = 17


class MlasWeight:
    """One block of a linear's weight (``out_rows`` output rows, ``in_features`` wide), packed by MLAS inside
    an ONNX Runtime session that computes ``x @ block.T``."""

    __slots__ = ("in_features", "out_rows", "session")

    def __init__(self, rows: torch.Tensor) -> None:
        """``rows``: the block as loaded (``(out, in)``), contiguous or a transposed ``(in, out)`` block's
        view (``TransposedLinear.rows_of``): either reaches MLAS as it is, with no copy to transpose it."""
        self.out_rows, self.in_features = int(rows.shape[0]), int(rows.shape[1])
        if rows.is_contiguous():
            self.session = _session(rows.detach().numpy(), transposed=False)
        else:
            self.session = _session(rows.detach().t().contiguous().numpy(), transposed=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s products (``(rows, in)``) with the block: ``(rows, out)``, a new tensor."""
        out = self.session.run(None, {"x": x.detach().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    @property
    def nbytes(self) -> int:
        return self.out_rows * self.in_features * 4


def _session(weight: np.ndarray, *, transposed: bool) -> Any:
    """A session computing ``x @ weight.T`` for ``weight`` ``(out, in)`` (a ``Gemm`` with ``transB``), or
    ``x @ weight`` for ``weight`` ``(in, out)`` with ``transposed`` (a ``MatMul``): MLAS packs either."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if transposed:
        k, n = weight.shape
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        n, k = weight.shape
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(weight.shape),
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(weight.nbytes))):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [node], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # no pool per session (see above)
    options.enable_cpu_mem_arena = False  # a freed session's memory goes back, not to an arena
    # One node: nothing to optimise, and the optimisers took a third of a session's start.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: a worker's log is not ONNX Runtime's
    options.add_external_initializers_from_files_in_memory(["w.bin"], [weight], [weight.nbytes])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@functools.cache
def mlas_works() -> bool:
    """Whether ONNX Runtime is installed and its products give ``F.linear``'s, from either form of a block,
    once the rows it was given are gone: a stage gives those pages back (or frees them) as soon as the
    session exists, so a build that kept reading them instead of its own copy would run on zeros."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 64, generator=gen), torch.randn(96, 64, generator=gen)
        want = torch.nn.functional.linear(x, w)
        sources = [w.clone(), w.t().contiguous()]
        blocks = [MlasWeight(sources[0]), MlasWeight(sources[1].t())]
        for source in sources:
            source.fill_(float("nan"))
        got = [block(x) for block in blocks]
    except Exception as exc:  # not installed, or a build that cannot run here: the stage runs without it
        log.info("ONNX Runtime's MLAS unavailable for CPU linears (%s)", exc)
        return False
    return all(torch.allclose(g, want, rtol=1e-4, atol=1e-4) for g in got)
