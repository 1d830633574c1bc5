"""The linears' kernel on a CPU (azu.engine.kernels): measured per machine for float32 stages (packed for
oneDNN, transposed for MKL, or as loaded with MKL or oneDNN per row count), PyTorch's own on request; every
choice gives transformers' greedy tokens for every family."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
import weakref

import pytest
import torch
from torch import nn

from azu.cli import demo
from azu.config import CPU_KERNELS, Settings, SettingsError
from azu.engine import kernels
from azu.engine.local import LocalPipeline
from azu.engine.mlas import mlas_works
from azu.engine.span import Span
from azu.engine.stage import Stage
from tests.support.engine import NEW_TOKENS

pytestmark = pytest.mark.skipif(not kernels.onednn_works(), reason="this PyTorch has no oneDNN linear")


PACKED = kernels.KernelPlan(layout="packed", onednn_rows=frozenset(kernels.ROW_BUCKETS),
                            pad_to={1: 4, 2: 4, 3: 3})
TRANSPOSED = kernels.KernelPlan(layout="transposed", onednn_rows=frozenset(kernels.ROW_BUCKETS), pad_to={})
PLAIN = kernels.KernelPlan(layout="loaded", onednn_rows=frozenset({4, 8, 16, 128}), pad_to={})
TRANSPOSED_BLAS = kernels.KernelPlan(layout="transposed", onednn_rows=frozenset(), pad_to={},
                                     blas_rows=frozenset({4, 8, 16, 128}))


def _linears(stage: Stage) -> list[type]:
    return [type(m) for m in stage.model.modules()
            if isinstance(m, kernels.BlockedLinear) or (isinstance(m, nn.Linear) and not m.weight.is_meta)]


def test_a_float32_cpu_stage_runs_its_linears_as_the_plan_says(built) -> None:
    b = built("llama")
    span = Span(0, 2, embeddings=True)
    packed = Stage.load(b.shards, span, kernels="packed")
    transposed = Stage.load(b.shards, span, kernels="transposed")
    as_loaded = Stage.load(b.shards, span, kernels="plain")
    plain = Stage.load(b.shards, span, kernels="torch")
    assert _linears(packed) and set(_linears(packed)) == {kernels.PackedLinear}
    assert set(_linears(transposed)) == {kernels.TransposedLinear}
    assert set(_linears(as_loaded)) == {kernels.DispatchLinear}
    assert len({len(_linears(s)) for s in (packed, transposed, as_loaded, plain)}) == 1
    assert set(_linears(plain)) == {nn.Linear}
    # A stage this small stays in the cache: auto leaves it on torch's linear without measuring.
    assert set(_linears(Stage.load(b.shards, span))) == {nn.Linear}
    # Modules of layers this stage does not hold stay on meta and are left alone.
    assert all(type(m) is nn.Linear for m in packed.model.modules()
               if isinstance(m, nn.Linear) and m.weight.is_meta)
    # The packed and transposed modules give the plain one's products, up to float rounding, for every row
    # count (1-3 padded as measured); no weight is left to read.
    module = next(m for m in packed.model.modules() if type(m) is kernels.PackedLinear)
    name = next(n for n, m in packed.model.named_modules() if m is module)
    original = plain.model.get_submodule(name)
    for shape in ((1, 1), (1, 2), (3, 1), (3, 5)):
        x = torch.randn(*shape, original.in_features)
        for stage in (packed, transposed, as_loaded):
            torch.testing.assert_close(stage.model.get_submodule(name)(x), original(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(module, "weight") and not hasattr(transposed.model.get_submodule(name), "weight")
    assert Stage.load(b.shards, span, dtype="bfloat16").model is not None
    assert kernels.plan_for("packed", torch.device("cpu"), torch.bfloat16, 1 << 40, ((64, 64),)) is None
    assert kernels.plan_for("packed", torch.device("cuda"), torch.float32, 1 << 40, ((64, 64),)) is None
    with pytest.raises(ValueError, match="unknown kernels"):
        kernels.plan_for("fast", torch.device("cpu"), torch.float32, 0, ((64, 64),))


def _times(mkl: list[float], onednn: list[float], packed: list[float],
           transposed: list[float] | None = None) -> kernels.Timings:
    """Figures per row bucket; MKL on the transposed weight as fast as on the loaded one unless given."""
    rows = kernels.ROW_BUCKETS
    return {(name, r): ms for name, figures in (("mkl", mkl), ("onednn", onednn), ("packed", packed),
                                                ("transposed", transposed or mkl))
            for r, ms in zip(rows, figures, strict=True)}


# Like the AMD EPYC with AVX2 (Zen 2) of 2026-12-02: MKL on the transposed weight runs one row 18% faster
# than anything on the weight as loaded and batches 5-10% slower; packed runs batches a little faster but one
# row 30% slower.
ZEN2 = _times(
    mkl=[3.94, 7.16, 7.5, 8.95, 10.46, 14.08, 59.9], onednn=[3.72, 6.30, 6.6, 7.08, 8.78, 11.74, 52.5],
    packed=[4.90, 5.64, 5.9, 6.85, 8.03, 10.64, 51.5], transposed=[3.22, 5.64, 6.4, 7.86, 9.23, 12.31, 54.7])
# Like the Intel Xeon with AVX-512 and AMX of 2026-12-02 (bench/linears.py): MKL as loaded runs one row about
# as fast as anything, packed runs 4-16 rows in 60-75% of oneDNN's time and one row 19% slower.
AMX = _times(
    mkl=[3.99, 4.31, 6.0, 7.70, 10.13, 10.42, 30.04], onednn=[4.57, 5.93, 6.2, 6.46, 7.52, 8.63, 28.86],
    packed=[4.76, 4.92, 4.9, 4.83, 5.94, 7.72, 28.66], transposed=[3.88, 6.01, 6.5, 7.37, 9.44, 10.99, 26.35])


def _chosen(times: kernels.Timings) -> tuple[str, str | None]:
    """The plan's layout and batch layout for ``times``."""
    plan = kernels.plan_from(times)
    return plan.layout, plan.batch_layout


def test_the_plan_puts_one_users_decode_first_then_batches() -> None:
    # Like the AVX2 machine: oneDNN beats MKL, packed wins every row count, three rows faster run as four.
    avx2 = _times(mkl=[1.45, 1.6, 1.8, 2.0, 2.93, 3.82, 20], onednn=[0.81, 1.2, 1.4, 1.6, 2.14, 2.94, 16],
                  packed=[0.56, 0.7, 0.8, 0.75, 0.90, 1.60, 15])
    plan = kernels.plan_from(avx2)
    assert plan.layout == "packed" and plan.pad_to == {1: 1, 2: 2, 3: 4}
    assert plan.onednn_rows == set(kernels.ROW_BUCKETS)
    # Like the AVX-512 machine: MKL wins 1-3 rows, oneDNN as loaded ties packed from 4 rows up; at 128 rows
    # all three are within noise, so MKL (what generate runs) keeps it.
    avx512 = _times(mkl=[1.07, 1.10, 1.23, 2.22, 2.79, 2.61, 8.3],
                    onednn=[1.12, 1.6, 1.68, 1.64, 1.72, 2.24, 8.2],
                    packed=[1.19, 1.34, 1.59, 1.51, 1.70, 2.14, 8.1])
    plan = kernels.plan_from(avx512)
    assert plan.layout == "loaded" and plan.onednn_rows == {4, 8, 16}
    # Like the AMD EPYC with AVX-512: one row padded to four ties oneDNN as loaded (a measurement puts it
    # 10% ahead or 30%), batches run in two thirds of the time: packed, whichever way the tie falls.
    zen4 = _times(mkl=[0.90, 1.77, 2.39, 1.41, 1.66, 2.20, 9.4],
                  onednn=[0.72, 1.03, 1.10, 1.16, 1.39, 1.84, 8.3],
                  packed=[0.79, 0.94, 0.65, 0.66, 0.85, 1.17, 7.5])
    plan = kernels.plan_from(zen4)
    assert plan.layout == "packed" and plan.pad_to == {1: 3, 2: 3, 3: 3}
    zen4[("packed", 3)] = zen4[("packed", 4)] = 0.71  # one row a hair faster packed: still packed
    assert kernels.plan_from(zen4).layout == "packed"
    # Packing that wins batches and costs one user's step anything (5%, or more): one user keeps the faster
    # row, batches move to packed while they last. As fast for one row: one layout for both. Forced, it is
    # the only layout.
    costly = dict(avx2)
    costly.update({("packed", r): 0.85 for r in (1, 2, 3, 4)})
    assert _chosen(costly) == ("loaded", "packed")
    costly.update({("packed", r): 0.95 for r in (1, 2, 3, 4)})
    assert _chosen(costly) == ("loaded", "packed")
    costly.update({("packed", r): 0.81 for r in (1, 2, 3, 4)})
    assert _chosen(costly) == ("packed", None)
    assert kernels.plan_from(costly, "packed").layout == "packed"
    assert kernels.plan_from(avx2, "plain").layout == "loaded"
    assert kernels.plan_from(avx512, "transposed").layout == "transposed"


def test_one_row_takes_the_layout_that_runs_it_clearly_fastest_and_batches_theirs() -> None:
    # One user on transposed; batches on packed, moved to while they last.
    zen2 = dict(ZEN2)
    assert _chosen(zen2) == ("transposed", "packed")
    # Batches that lose a lot on transposed do not cost one user the faster row: they move to packed.
    costly = dict(zen2)
    costly.update({("transposed", r): 1.3 * zen2["onednn", r] for r in (4, 8, 16)})
    assert _chosen(costly) == ("transposed", "packed")
    # One row only a hair faster transposed (not worth a copy of every weight), and batches no more than a
    # hair faster packed: the loaded layout for all.
    close = dict(zen2)
    close["transposed", 1] = 3.60
    assert _chosen(close) == ("loaded", None)
    # Packed, one row no slower than transposed and batches clearly faster: one layout for both.
    packed = dict(zen2)
    packed.update({("packed", r): ms for r, ms in ((1, 3.2), (2, 3.3), (3, 3.4), (4, 4), (8, 5), (16, 7))})
    assert _chosen(packed) == ("packed", None)
    # Forced, a layout stays put.
    assert kernels.plan_from(zen2, "transposed").batch_layout is None
    assert kernels.plan_from(zen2, "plain").layout == "loaded"


def test_the_weights_as_loaded_may_serve_one_user_and_another_layout_batches() -> None:
    amx = dict(AMX)
    assert _chosen(amx) == ("loaded", "packed")
    assert kernels.plan_from(amx).describe() == (
        "as loaded; oneDNN for [4, 8, 16] rows, MKL for the rest; under batches of 4+ jobs: packed for "
        "oneDNN (rows padded: 2->4, 3->4)")
    # The same CPU as its workers measured it (one row: MKL 4.07 ms, transposed 3.61): transposed, packed.
    amx["mkl", 1], amx["transposed", 1] = 4.07, 3.61
    assert _chosen(amx) == ("transposed", "packed")
    # A tie for one row: one layout where packed runs it no slower, else moves; either way one user runs on
    # a layout within a hair of the fastest.
    for packed_row, chosen in ((3.99, ("packed", None)), (4.00, ("packed", None)),
                               (4.01, ("loaded", "packed"))):
        tie = dict(amx)
        tie.update({("mkl", 1): 4.0, ("transposed", 1): 4.2, ("packed", 1): packed_row})
        assert _chosen(tie) == chosen, packed_row


def test_batches_move_where_any_other_layout_runs_one_row_faster() -> None:
    # Like the Intel Xeon with AMX of 2026-12-02 as its first Qwen worker measured it at load (1, 8, 16 rows
    # from its log; 2-4 and 128 rows from bench/linears.py there, packed 4 rows as the log's padding implies):
    # as loaded runs one row a hair under 10% faster than packed, transposed 8% faster than as loaded, and
    # neither is clearly faster by itself; transposed is clearly faster than packed, so batches move to packed
    # and one user stays on the weights as loaded (one layout, packed, cost P1 a fifth of its speed).
    xeon = _times(mkl=[4.37, 4.48, 6.5, 8.03, 11.38, 11.50, 30.14],
                  onednn=[5.22, 6.04, 6.3, 6.47, 7.53, 10.58, 28.73],
                  packed=[4.87, 5.16, 5.0, 4.80, 5.75, 7.27, 27.29],
                  transposed=[4.00, 6.01, 6.9, 7.43, 10.17, 11.19, 25.90])
    assert kernels.plan_from(xeon).pad_to[1] == 4
    assert _chosen(xeon) == ("loaded", "packed")
    # Packed runs one row faster than the layout one user would get (as loaded, transposed not clearly
    # faster than it): packed for both, though transposed runs the row faster still.
    band = dict(xeon)
    band["packed", 4] = 4.20
    assert _chosen(band) == ("packed", None)
    # No layout clearly faster than packed for one row: still one user as loaded (9% faster than packed),
    # batches packed; as fast packed: packed for both, no moves.
    xeon["transposed", 1] = 4.40
    assert _chosen(xeon) == ("loaded", "packed")
    xeon["packed", 4] = 4.30
    assert _chosen(xeon) == ("packed", None)


# Like the AMD EPYC of family 25, model 1 (Zen 3) with AVX2 of 2026-12-03 (bench/linears.py, medians of
# three; 3 rows, which it does not print, between 2 and 4): numpy's BLAS (OpenBLAS) on the transposed weight
# runs 2-128 rows as fast as packed or faster (16 rows 17%), one row no slower than anything; MKL on the same
# transposed weight runs batches no faster than as loaded.
ZEN3 = {**_times(mkl=[4.73, 10.26, 12.0, 13.84, 14.35, 20.53, 65.00],
                 onednn=[4.92, 10.09, 11.0, 11.59, 12.17, 15.44, 55.26],
                 packed=[7.09, 7.97, 8.3, 8.61, 9.58, 13.88, 53.90],
                 transposed=[4.64, 9.55, 10.6, 11.74, 16.57, 16.01, 54.84]),
        **{("blas", r): ms for r, ms in zip(kernels.ROW_BUCKETS, [4.47, 8.54, 8.6, 8.76, 9.58, 11.49, 48.76],
                                             strict=True)}}


def test_numpy_blas_takes_the_transposed_layouts_row_counts_it_runs_clearly_faster() -> None:
    plan = kernels.plan_from(ZEN3)
    assert plan.blas_rows == {2, 3, 4, 8, 16, 128}  # one row: 4.47 against 4.64, not clearly faster
    # One layout for one user and batches alike: as fast as packed for batches, no moves between layouts.
    assert (plan.layout, plan.batch_layout) == ("transposed", None)
    assert plan.describe() == ("transposed (in x out); numpy's BLAS for [2, 3, 4, 8, 16, 128] rows, MKL for "
                               "the rest")
    # Without its figures (a numpy whose BLAS does not run here), the same machine as before: no BLAS rows,
    # and the batches on packed.
    without = {key: ms for key, ms in ZEN3.items() if key[0] != "blas"}
    assert kernels.plan_from(without).blas_rows == frozenset()
    assert _chosen(without) == ("loaded", "packed")
    assert kernels.plan_from(ZEN2).blas_rows == frozenset()  # the older figures carry none


def _rows_figures(**kinds: list[float]) -> kernels.Timings:
    return {(name, r): ms for name, figures in kinds.items()
            for r, ms in zip(kernels.ROW_BUCKETS, figures, strict=True)}


# The same kind of Zen 3 on 2026-12-03 (twenty-ninth session), as a worker measures (384 MB of Qwen layers;
# the last stage of 12 layers, its share of the head counted), with ONNX Runtime's MLAS: 2-8 rows in 40-60% of
# numpy's BLAS's time on the layers, one row no faster than anything.
ZEN3_LAYERS = _rows_figures(
    mkl=[4.66, 9.19, 13.75, 11.69, 13.28, 15.92, 66.32],
    onednn=[4.07, 9.02, 9.09, 10.85, 12.45, 16.70, 63.44],
    transposed=[4.12, 8.20, 10.97, 12.22, 14.55, 17.89, 75.16],
    blas=[4.09, 8.65, 12.17, 8.28, 11.51, 13.04, 58.20],
    packed=[5.29, 6.56, 6.44, 7.23, 9.64, 11.25, 62.42],
    mlas=[4.66, 5.03, 5.16, 5.04, 7.99, 11.82, 55.27])
ZEN3_LAST_STAGE = _rows_figures(
    mkl=[8.80, 17.83, 27.54, 23.86, 26.56, 32.85, 131.19],
    onednn=[8.43, 17.73, 18.67, 20.00, 21.95, 28.42, 102.24],
    transposed=[7.90, 12.83, 17.81, 22.10, 27.26, 31.27, 136.18],
    blas=[7.39, 16.31, 20.10, 11.87, 19.38, 22.37, 98.44],
    packed=[12.37, 11.33, 11.36, 14.26, 15.95, 23.06, 104.48],
    mlas=[9.11, 8.31, 10.19, 10.76, 15.54, 19.83, 89.14])


def test_mlas_takes_the_batches_where_it_runs_them_clearly_fastest() -> None:
    # One user as before (as loaded with oneDNN for one row; transposed for the last stage, the head's one row
    # 20% faster there than on MLAS); batches move to MLAS.
    assert _chosen(ZEN3_LAYERS) == ("loaded", "mlas")
    assert kernels.plan_from(ZEN3_LAYERS).rereads_rows and not kernels.plan_from(ZEN3).rereads_rows
    assert _chosen(ZEN3_LAST_STAGE) == ("transposed", "mlas")
    assert kernels.plan_from(ZEN3_LAYERS).describe().endswith("under batches of 4+ jobs: packed by ONNX "
                                                               "Runtime's MLAS")
    # One row 3% slower on MLAS than the fastest: one user stays as loaded (until 2026-12-03 both went to
    # MLAS within 10%); as fast on MLAS: one layout for both, no moves.
    tie = {**ZEN3_LAYERS, ("mlas", 1): 4.2}
    assert _chosen(tie) == ("loaded", "mlas")
    tie["mlas", 1] = 4.07
    assert _chosen(tie) == ("mlas", None)
    # Without its figures (ONNX Runtime not installed, or its products wrong here), never MLAS; forced there,
    # the plan is auto's.
    without = {key: ms for key, ms in ZEN3_LAYERS.items() if key[0] != "mlas"}
    assert "mlas" not in _chosen(without)
    assert kernels.plan_from(without, "mlas") == kernels.plan_from(without)
    assert kernels.plan_from(ZEN3_LAYERS, "mlas").layout == "mlas"


def test_a_transposed_linear_runs_the_plans_row_counts_on_numpy_blas(monkeypatch) -> None:
    calls: list[int] = []
    product = kernels._blas_product
    monkeypatch.setattr(kernels, "_blas_product", lambda x, w: calls.append(x.shape[0]) or product(x, w))
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False))
    reference = copy.deepcopy(model)
    assert kernels.apply_plan(model, TRANSPOSED_BLAS, lambda _t: None) == 2
    for rows in (1, 3, 4, 7, 200):  # 1-3 rows on MKL; 4 and up on numpy's BLAS (7 -> 8, 200 -> 128's)
        x = torch.randn(rows, 32)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert calls == [4, 4, 7, 7, 200, 200]  # both linears, bias or none


def test_numpy_blas_runs_on_as_many_threads_as_pytorch() -> None:
    # In a process of its own whose BLAS starts with two threads (the tests' OMP_NUM_THREADS=1 would give it
    # one from the start, and the check could not fail) and PyTorch runs one.
    code = ("import json, torch, threadpoolctl\n"
            "torch.set_num_threads(1)\n"
            "from azu.engine import kernels\n"
            "works = kernels.blas_works()\n"
            "blas = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
            "print(json.dumps({'works': works, 'threads': blas}))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    got = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    timeout=120, check=True).stdout)
    if not got["threads"]:
        pytest.skip("threadpoolctl finds no BLAS of numpy's here")
    assert got == {"works": True, "threads": [1]}  # held to PyTorch's one thread, and then taken


def test_a_plain_linear_runs_each_row_count_on_the_kernel_the_plan_names(monkeypatch) -> None:
    calls: list[int] = []
    product = kernels._product
    monkeypatch.setattr(kernels, "_product", lambda x, w, b: calls.append(x.numel() // w.shape[1])
                        or product(x, w, b))
    model = nn.Sequential(nn.Linear(32, 48))
    reference = copy.deepcopy(model)
    assert kernels.apply_plan(model, PLAIN, lambda _t: None) == 0 and type(model[0]) is kernels.DispatchLinear
    for rows in (1, 3, 4, 7, 200):  # 1-3 rows on MKL; 4 and up on oneDNN (7 -> 8, 200 -> 128's choice)
        x = torch.randn(rows, 32)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert calls == [4, 7, 200]


def test_measuring_gives_every_kernel_and_row_count() -> None:
    shapes = kernels.layer_shapes({"num_attention_heads": 4, "num_key_value_heads": 2,
                                   "intermediate_size": 96}, 64)
    assert shapes == ((64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96))
    times = kernels.measure(shapes, working_bytes=1 << 20)
    kinds = ("mkl", "onednn", "transposed", "packed", *(("blas",) if kernels.blas_works() else ()),
             *(("mlas",) if mlas_works() else ()))
    assert {(k, r) for k in kinds for r in kernels.ROW_BUCKETS} <= set(times)
    assert all(ms > 0 for ms in times.values())
    assert isinstance(kernels.plan_from(times), kernels.KernelPlan)


def test_a_stages_measured_layer_carries_its_share_of_the_head_in_the_blocks_it_is_cut_into() -> None:
    layer = kernels.layer_shapes({"num_attention_heads": 14, "num_key_value_heads": 2,
                                  "intermediate_size": 4864}, 896)
    assert kernels.stage_shapes(layer, 7) == layer  # no head on the plan: the layer's linears alone
    shapes = kernels.stage_shapes(layer, 7, (151936, 896))
    block_rows = kernels.BLOCK_BYTES // (896 * 4)
    assert shapes[:7] == layer
    assert shapes[7:] == ((block_rows, 896), (block_rows, 896), (21706 - 2 * block_rows, 896))  # 151936 / 7
    assert kernels.stage_shapes(layer, 24, (151936, 896))[7:] == ((6331, 896),)
    assert kernels.stage_shapes(layer, 0, (100, 896))[7:] == ((100, 896),)  # a stage of the head alone


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # a head of its own; one tied to the embeddings
def test_a_stage_measures_its_kernels_on_the_head_it_runs_on_them(built, monkeypatch, family: str) -> None:
    from azu.registry.manifest import Manifest

    b = built(family)
    manifest = Manifest.load(b.shards)
    layer = kernels.layer_shapes(manifest.config, manifest.hidden_size)
    measured: list[kernels.LayerShapes] = []

    def plan_for(_kernels, _device, _dtype, _weight_bytes, shapes):
        measured.append(shapes)
        return None  # torch's linear: only what would be measured matters here

    monkeypatch.setattr("azu.engine.stage.plan_for", plan_for)
    n, head = manifest.num_layers, (manifest.vocab_size, manifest.hidden_size)
    Stage.load(b.shards, Span(0, 1, embeddings=True), device="cpu", dtype="float32")
    Stage.load(b.shards, Span(1, n, head=True), device="cpu", dtype="float32")
    Stage.load(b.shards, Span(0, n, embeddings=True, head=True), device="cpu", dtype="float32")
    # A head tied to the embeddings on the same stage stays as loaded: not measured.
    whole = layer if manifest.tied_head else kernels.stage_shapes(layer, n, head)
    assert measured == [layer, kernels.stage_shapes(layer, n - 1, head), whole]


@pytest.mark.parametrize("plan", [PACKED, TRANSPOSED, TRANSPOSED_BLAS],
                         ids=["packed", "transposed", "transposed-blas"])
def test_a_weight_converted_in_blocks_gives_the_same_products_and_frees_the_originals_pages(
        monkeypatch, plan: kernels.KernelPlan) -> None:
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # 1000 rows of 64 floats: 4 blocks of 256
    model = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8, bias=False))
    reference = copy.deepcopy(model)
    released: list[torch.Tensor] = []
    assert kernels.apply_plan(model, plan, released.append) == 2
    assert len(model[0].blocks) == 4 and len(model[1].blocks) == 1
    assert {type(m) for m in model} == {kernels.PackedLinear if plan is PACKED else kernels.TransposedLinear}
    if plan is TRANSPOSED_BLAS:
        assert model[0].blas_rows == plan.blas_rows
    assert [int(t.shape[0]) for t in released] == [256, 256, 256, 232, 8]
    for x in (torch.randn(2, 7, 64), torch.randn(1, 64), torch.randn(3, 64)):  # 1 row padded to 4, 3 not
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("plan", [PACKED, TRANSPOSED], ids=["packed", "transposed"])
def test_each_original_weight_is_freed_before_the_next_is_copied(plan: kernels.KernelPlan) -> None:
    # Weights that are not views of the file buffers (cast from another dtype) are freed by no ``release``:
    # only by their last reference going. Kept until the end, a stage would hold two copies at its peak.
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 8)))
    originals = [weakref.ref(m.weight) for m in (model[0], model[2][0], model[2][1])]
    alive_at_release: list[list[bool]] = []
    assert kernels.apply_plan(model, plan, lambda _rows: alive_at_release.append(
        [ref() is not None for ref in originals])) == 3
    # At each weight's (one block's) release: the weights converted before it are gone.
    assert alive_at_release == [[True, True, True], [False, True, True], [False, False, True]]
    assert all(ref() is None for ref in originals)


@pytest.mark.parametrize("plan", [PACKED, TRANSPOSED], ids=["packed", "transposed"])
def test_a_weight_something_else_reads_is_not_converted_nor_released(plan: kernels.KernelPlan) -> None:
    embed, head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
    head.weight = embed.weight  # tied, as a stage holding both ends of a tied model has them
    view = nn.Linear(16, 4)
    view.weight = nn.Parameter(embed.weight[:4], requires_grad=False)  # a view into another tensor's bytes
    twice = nn.Linear(16, 8)  # one module held in two places
    strided = nn.Linear(16, 8)
    strided.weight = nn.Parameter(torch.randn(16, 8).t(), requires_grad=False)  # a transposed view
    model = nn.ModuleDict({"embed": embed, "head": head, "view": view, "a": twice,
                           "b": nn.Sequential(twice), "strided": strided})
    reference = copy.deepcopy(model)
    released: list[torch.Tensor] = []
    assert kernels.apply_plan(model, plan, released.append) == 0 and not released
    # Read in place (on the weight as it is, or torch's linear for the strided one): same products.
    assert {type(model[k]) for k in ("head", "view", "a")} == {kernels.DispatchLinear}
    assert model["b"][0] is model["a"] and type(model["strided"]) is nn.Linear
    x = torch.randn(3, 16)
    for k in ("head", "view", "a", "strided"):
        torch.testing.assert_close(model[k](x), reference[k](x), rtol=1e-5, atol=1e-5)


SWITCHING = kernels.KernelPlan(layout="loaded", onednn_rows=frozenset({4, 8, 16}), pad_to={1: 4},
                               batch_layout="packed")


@pytest.mark.parametrize(("light", "heavy"), [("loaded", "packed"), ("transposed", "packed"),
                                              ("packed", "transposed"), ("transposed", "loaded")])
def test_a_stage_moves_to_the_batch_layout_while_batches_last_and_back(monkeypatch, light: str,
                                                                       heavy: str) -> None:
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # the first weight in 4 blocks
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1000 * 64 * 4)  # one weight a step
    model = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8, bias=False))
    reference = copy.deepcopy(model)
    plan = kernels.KernelPlan(layout=light, onednn_rows=frozenset({4, 8}), pad_to={1: 4}, batch_layout=heavy)
    released: list[torch.Tensor] = []
    kernels.apply_plan(model, plan, released.append)
    switch = kernels.LayoutSwitch(model, plan, released.append)
    kinds = kernels.LAYOUT_MODULES
    x = torch.randn(5, 64)

    def step(jobs: int) -> tuple[type, ...]:
        switch.after_step(jobs)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)  # mid-way too
        return tuple(type(m) for m in model)

    # One user's steps, and a long prompt's chunks (one job, many rows): the weights stay put.
    assert {step(1) for _ in range(40)} == {(kinds[light],) * 2}
    # Batches of 4+ jobs, seven in a row, then one user: not enough to move.
    assert {step(8) for _ in range(kernels.SWITCH_AFTER_STEPS - 1)} | {step(1)} == {(kinds[light],) * 2}
    # Eight in a row: the move starts, one weight a step.
    layouts = [step(8) for _ in range(kernels.SWITCH_AFTER_STEPS)]
    assert layouts[-1] == (kinds[heavy], kinds[light]) and step(8) == (kinds[heavy],) * 2
    assert switch.settled and switch.layout == heavy
    # Back after SWITCH_BACK_AFTER_STEPS steps of fewer jobs (a batch among them starts the count again).
    assert {step(2) for _ in range(kernels.SWITCH_BACK_AFTER_STEPS - 1)} | {step(8)} == {(kinds[heavy],) * 2}
    back = [step(1) for _ in range(kernels.SWITCH_BACK_AFTER_STEPS + 1)]
    assert back[-2:] == [(kinds[light], kinds[heavy]), (kinds[light],) * 2] and switch.switches == 2
    # The weights as loaded are views of the file's pages: given back as they move, each block once.
    if light == "loaded":
        assert [int(t.shape[0]) for t in released] == [256, 256, 256, 232, 8]
    # Over and over: no block is lost or kept twice.
    for _ in range(3):
        for _ in range(kernels.SWITCH_AFTER_STEPS + 2):
            step(16)
        for _ in range(kernels.SWITCH_BACK_AFTER_STEPS + 2):
            step(1)
    assert switch.switches == 8 and [len(m.blocks) for m in model] == [4, 1]


def test_a_linear_moves_block_by_block_and_can_turn_back_half_way(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # 1000 rows of 64 floats: 4 blocks of 256
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1)  # one block a step
    monkeypatch.setattr(kernels, "SWITCH_AFTER_STEPS", 1)
    monkeypatch.setattr(kernels, "SWITCH_BACK_AFTER_STEPS", 1)
    model = nn.Sequential(nn.Linear(64, 1000))
    reference = copy.deepcopy(model)
    kernels.apply_plan(model, SWITCHING, lambda _rows: None)
    switch = kernels.LayoutSwitch(model, SWITCHING, lambda _rows: None)
    x = torch.randn(3, 2, 64)

    def step(jobs: int) -> tuple[int, int]:
        """(blocks packed, blocks as loaded) after a step of ``jobs`` jobs; the products checked."""
        switch.after_step(jobs)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
        m = model[0]
        if isinstance(m, kernels.MovingLinear):
            assert m.out_features == 1000 and m.first.out_features + m.rest.out_features == 1000
            packed = m.first if isinstance(m.first, kernels.PackedLinear) else m.rest
            return len(packed.blocks), 4 - len(packed.blocks)
        return (4, 0) if isinstance(m, kernels.PackedLinear) else (0, 4)

    assert [step(8) for _ in range(3)] == [(1, 3), (2, 2), (3, 1)]  # the first rows first
    assert [step(1) for _ in range(3)] == [(2, 2), (1, 3), (0, 4)]  # turned back: the last moved first
    assert [step(8) for _ in range(5)] == [(1, 3), (2, 2), (3, 1), (4, 0), (4, 0)]
    assert isinstance(model[0], kernels.PackedLinear) and switch.settled
    # With nothing to run, the worker moves them back to one user's layout, a step's worth at a time, once no
    # step has come for SWITCH_BACK_IDLE_S (not between bursts a moment apart).
    assert not switch.move_when_idle() and isinstance(model[0], kernels.PackedLinear)
    monkeypatch.setattr(kernels, "SWITCH_BACK_IDLE_S", 0.0)
    assert [switch.move_when_idle() for _ in range(5)] == [True, True, True, False, False]
    assert isinstance(model[0], kernels.RowsLinear) and switch.layout == "loaded"
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
    # Asked (a measurement of the batch layout's steady state): the whole move at once, and back.
    assert switch.move_all("packed")
    assert isinstance(model[0], kernels.PackedLinear) and switch.settled and switch.layout == "packed"
    assert switch.move_all("loaded")
    assert isinstance(model[0], kernels.RowsLinear) and switch.settled
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("failing", ["convert", "release"])
def test_a_move_that_fails_leaves_every_linear_whole_and_moves_no_more(monkeypatch, failing: str) -> None:
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # 4 blocks
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1)  # one block a step
    model = nn.Sequential(nn.Linear(64, 1000))
    reference = copy.deepcopy(model)
    released: list[torch.Tensor] = []

    def release(rows: torch.Tensor) -> None:
        if failing == "release" and released:
            raise OSError("madvise: invalid argument")
        released.append(rows)

    kernels.apply_plan(model, SWITCHING, release)
    switch = kernels.LayoutSwitch(model, SWITCHING, release)
    for _ in range(kernels.SWITCH_AFTER_STEPS + 1):
        switch.after_step(8)
    assert isinstance(model[0], kernels.MovingLinear)  # two blocks moved (or one, then a failed release)

    def no_memory(_rows: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    if failing == "convert":
        monkeypatch.setattr(kernels.PackedLinear, "convert", staticmethod(no_memory))
    x = torch.randn(3, 64)
    for jobs in [8] * 20 + [1] * 20:
        switch.after_step(jobs)  # the failure is logged, not raised into a step
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
    assert not switch.move_when_idle() and switch.plan.batch_layout is None
    assert not switch.move_all(switch.plan.layout)  # asked: it says the weights are not all there
    moving = model[0]
    assert isinstance(moving, kernels.MovingLinear)
    assert len(moving.first.blocks) + len(moving.rest.blocks) == 4  # none lost


def _linears_on_files(tmp_path, files) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """Two linears whose weights are views of a shard file's verified bytes, loaded by ``files`` (as a
    stage's are), and the weights they hold."""
    from safetensors.torch import save_file

    from azu.registry.download import sha256_file
    from azu.registry.manifest import FileEntry

    gen = torch.Generator().manual_seed(0)
    weights = {"a": 0.1 * torch.randn(1000, 64, generator=gen),
               "b": 0.05 * torch.randn(8, 1000, generator=gen)}
    path = tmp_path / "layer_00000.safetensors"
    save_file(weights, str(path))
    entry = FileEntry(name=path.name, kind="layer", layer=0, sha256=sha256_file(path),
                      size=path.stat().st_size, tensors=("a", "b"))
    loaded = files.load(tmp_path, entry)
    model = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8, bias=False))
    for linear, key in zip(model, "ab", strict=True):
        linear.weight = nn.Parameter(loaded[key], requires_grad=False)
    return model, weights


def _rows(module: nn.Module) -> torch.Tensor:
    """The weight as loaded that a blocked linear holds, read back from its blocks."""
    assert isinstance(module, kernels.BlockedLinear) and module.readable
    return torch.cat([type(module).rows_of(b) for b in module.blocks])


@pytest.mark.parametrize("light", ["loaded", "transposed", "packed"])
def test_a_stage_moves_to_mlas_and_back_reading_its_rows_from_the_files(tmp_path, monkeypatch,
                                                                       light: str) -> None:
    from azu.registry.manifest import LoadedFiles

    if not mlas_works():
        pytest.skip("ONNX Runtime's MLAS does not run here")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # the first weight in 4 blocks
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1000 * 64 * 4)  # one weight a step
    files = LoadedFiles(restorable=True)
    model, weights = _linears_on_files(tmp_path, files)
    reference = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8, bias=False))
    reference[0].weight.data, reference[0].bias.data = weights["a"], model[0].bias.detach().clone()
    reference[1].weight.data = weights["b"]
    plan = dataclasses.replace(SWITCHING, layout=light, batch_layout="mlas")
    restored: list[int] = []
    restore = files.restore
    monkeypatch.setattr(files, "restore", lambda t: restored.append(t.shape[0]) or restore(t))
    kernels.apply_plan(model, plan, files.release, files)
    switch = kernels.LayoutSwitch(model, plan, files.release, files)
    one_user, mlas = kernels.LAYOUT_MODULES[light], kernels.MlasLinear
    x = torch.randn(5, 64)
    for _ in range(3):
        for _ in range(kernels.SWITCH_AFTER_STEPS + 2):
            switch.after_step(8)
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
        assert [type(m) for m in model] == [mlas, mlas] and switch.layout == "mlas"
        for _ in range(kernels.SWITCH_BACK_AFTER_STEPS + 2):
            switch.after_step(1)
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
        assert [type(m) for m in model] == [one_user, one_user]
        # Back bit for bit, each block's rows read from the file again (checked against its checksum).
        assert torch.equal(_rows(model[0]), weights["a"]) and torch.equal(_rows(model[1]), weights["b"])
    assert switch.switches == 6 and restored == [256, 256, 256, 232, 8] * 3


def test_a_linear_whose_rows_cannot_be_read_again_stays_off_mlas(tmp_path, monkeypatch) -> None:
    from azu.registry.manifest import LoadedFiles

    if not mlas_works():
        pytest.skip("ONNX Runtime's MLAS does not run here")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)
    files = LoadedFiles(restorable=True)
    model, weights = _linears_on_files(tmp_path, files)
    model[1].weight = nn.Parameter(weights["b"].clone(), requires_grad=False)  # the heap's, not a file's
    plan = dataclasses.replace(SWITCHING, layout="transposed", batch_layout="mlas")
    kernels.apply_plan(model, plan, files.release, files)
    switch = kernels.LayoutSwitch(model, plan, files.release, files)
    for _ in range(kernels.SWITCH_AFTER_STEPS + 4):
        switch.after_step(8)
    # It would have no way back: it stays transposed, and the other moves.
    assert switch.settled and [type(m) for m in model] == [kernels.MlasLinear, kernels.TransposedLinear]
    # Without files to read from (a stage whose plan has no MLAS), nothing goes to MLAS.
    files = LoadedFiles(restorable=True)
    model, _ = _linears_on_files(tmp_path, files)
    kernels.apply_plan(model, plan, files.release)
    switch = kernels.LayoutSwitch(model, plan, files.release)
    for _ in range(kernels.SWITCH_AFTER_STEPS + 4):
        switch.after_step(8)
    assert switch.settled and {type(m) for m in model} == {kernels.TransposedLinear}


def test_rows_changed_on_disk_stop_the_move_back_and_every_linear_stays_whole(tmp_path, monkeypatch) -> None:
    from azu.registry.manifest import LoadedFiles

    if not mlas_works():
        pytest.skip("ONNX Runtime's MLAS does not run here")
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1)  # one block a step
    files = LoadedFiles(restorable=True)
    model, weights = _linears_on_files(tmp_path, files)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for linear, key in zip(reference, "ab", strict=True):
            linear.weight.copy_(weights[key])
    plan = dataclasses.replace(SWITCHING, batch_layout="mlas")
    kernels.apply_plan(model, plan, files.release, files)
    switch = kernels.LayoutSwitch(model, plan, files.release, files)
    for _ in range(kernels.SWITCH_AFTER_STEPS + 8):
        switch.after_step(8)
    assert switch.settled and {type(m) for m in model} == {kernels.MlasLinear}
    # The file changes on disk (rewritten in place: a new model in the same folder), then the load goes.
    path = tmp_path / "layer_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    x = torch.randn(3, 64)
    for _ in range(kernels.SWITCH_BACK_AFTER_STEPS + 10):
        switch.after_step(1)  # the failure is logged, not raised into a step
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)
    assert switch.plan.batch_layout is None and not switch.move_when_idle()
    # The blocks read before the changed one came back as loaded; the rest stayed on MLAS; none lost.
    first = model[0]
    assert isinstance(first, kernels.MovingLinear) and isinstance(first.first, kernels.RowsLinear)
    assert len(first.first.blocks) + len(first.rest.blocks) == 4 and 0 < len(first.first.blocks) < 4
    assert torch.equal(_rows(first.first), weights["a"][:first.first.out_features])


@pytest.mark.parametrize("batches", ["packed", "mlas"])
def test_a_stage_that_switches_layouts_mid_answer_keeps_each_jobs_greedy_tokens(built, monkeypatch,
                                                                                 batches: str) -> None:
    from tests.support.engine import decode_together

    if batches == "mlas" and not mlas_works():
        pytest.skip("ONNX Runtime's MLAS does not run here")
    b = built("llama")
    # To MLAS and back, the rows come from the stage's shard files again (LoadedFiles.restore).
    plan = dataclasses.replace(SWITCHING, batch_layout=batches)
    monkeypatch.setattr("azu.engine.stage.plan_for", lambda *_args: plan)
    monkeypatch.setattr(kernels, "SWITCH_AFTER_STEPS", 2)
    monkeypatch.setattr(kernels, "SWITCH_BACK_AFTER_STEPS", 3)
    monkeypatch.setattr(kernels, "SWITCH_BYTES_PER_STEP", 1)  # one linear a step: stages half-way for long
    pipe = LocalPipeline(b.shards, 2)
    assert all(stage.layouts is not None for stage in pipe.stages)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, demo.VOCAB_SIZE, (n,), generator=gen).tolist() for n in (5, 17, 9, 12)]
    alone = [LocalPipeline(b.shards, 2, kernels="plain").generate(p, max_tokens=NEW_TOKENS).token_ids
             for p in prompts]
    nxt = {f"j{i}": torch.tensor(p) for i, p in enumerate(prompts)}
    got: dict[str, list[int]] = {k: [] for k in nxt}
    for k in list(nxt):
        token = int(pipe.step(k, nxt[k]).argmax())
        got[k].append(token)
        nxt[k] = torch.tensor([token])
    for _ in range(NEW_TOKENS // 2):  # together: the stages move to the batch layout
        decode_together(pipe.stages, list(nxt), nxt, got)
    assert all(stage.layouts.layout == batches for stage in pipe.stages)
    moved = kernels.LAYOUT_MODULES[batches]
    assert all(any(type(m) is moved for m in stage.model.modules()) for stage in pipe.stages)
    for k in nxt:  # then one at a time: back to the weights as loaded
        while len(got[k]) < NEW_TOKENS:
            token = int(pipe.step(k, nxt[k]).argmax())
            got[k].append(token)
            nxt[k] = torch.tensor([token])
    assert all(stage.layouts.layout == "loaded" and stage.layouts.switches == 2 for stage in pipe.stages)
    assert [got[f"j{i}"] for i in range(len(prompts))] == alone


@pytest.mark.parametrize("family", sorted(demo.FAMILIES))
def test_every_kernel_choice_gives_generates_greedy_tokens(built, family: str) -> None:
    b = built(family)
    expected = b.reference()
    for choice in ("packed", "transposed", "mlas", "plain", "torch"):
        pipe = LocalPipeline(b.shards, 2, kernels=choice)
        assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == expected, choice


@pytest.mark.parametrize("family", sorted(demo.FAMILIES))
def test_numpy_blas_on_every_row_count_gives_generates_greedy_tokens(built, monkeypatch, family: str) -> None:
    if not kernels.blas_works():
        pytest.skip("numpy's BLAS does not run here")
    everywhere = dataclasses.replace(TRANSPOSED_BLAS, blas_rows=frozenset(kernels.ROW_BUCKETS))
    monkeypatch.setattr(kernels, "measured_plan", lambda *_args: everywhere)
    b = built(family)
    pipe = LocalPipeline(b.shards, 2, kernels="transposed")
    assert any(isinstance(m, kernels.TransposedLinear) and m.blas_rows for stage in pipe.stages
               for m in stage.model.modules())
    assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == b.reference()


def test_the_kernel_setting_is_checked() -> None:
    assert Settings.from_env({}).worker.cpu_kernels == "auto"
    assert Settings.from_env({"AZU_CPU_KERNELS": "TORCH"}).worker.cpu_kernels == "torch"
    assert Settings.from_env({"AZU_CPU_KERNELS": "plain"}).worker.cpu_kernels == "plain"
    assert Settings.from_env({"AZU_CPU_KERNELS": "transposed"}).worker.cpu_kernels == "transposed"
    assert CPU_KERNELS == kernels.KERNELS
    with pytest.raises(SettingsError, match="AZU_CPU_KERNELS"):
        Settings.from_env({"AZU_CPU_KERNELS": "cuda"})


def test_worker_processes_of_one_host_measure_one_at_a_time() -> None:
    # A second process's measurement waits while this one holds the host's lock, then runs.
    script = ("from azu.engine import kernels\n"
              "print('ready', flush=True)\n"
              "kernels._measured(((64, 64),), 1 << 20)\n"
              "print('measured', flush=True)\n")
    with kernels.one_measurement_at_a_time():
        other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        with contextlib.suppress(subprocess.TimeoutExpired):
            other.wait(timeout=3)  # unlocked, its measurement takes well under a second
        assert other.poll() is None, "measured while another process held the lock"
    out, _ = other.communicate(timeout=120)
    assert other.returncode == 0 and out.strip() == "measured"


def test_a_lock_held_too_long_or_not_to_be_had_lets_the_measurement_run(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "MEASURE_LOCK_WAIT_S", 0.3)
    with kernels.one_measurement_at_a_time():
        start = time.monotonic()
        with kernels.one_measurement_at_a_time():  # another holder (here: this process's other open file)
            assert 0.3 <= time.monotonic() - start < 5
    # No usable temp directory: unlocked, not an error at import or at load.
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: "/nonexistent-azu-dir")
    with kernels.one_measurement_at_a_time():
        pass
