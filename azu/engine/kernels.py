"""Which matrix-multiply kernel a stage's linear layers use on a CPU.

On a CPU, PyTorch's ``F.linear`` goes to MKL's sgemm. For the shapes a pipeline stage runs (a few rows
against a large weight: decode steps, micro-batches) that is far from what the CPU allows. oneDNN's
inner-product primitive, which PyTorch ships and its own compiler uses for CPU linears
(``torch.ops.mkldnn._linear_pointwise``), is faster on the weight as it is, and much faster on a weight
reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the layout
PyTorch's compiler packs frozen weights into). Measured on this project's 2-core machine, one thread, fp32,
in milliseconds per product:

=======================  ======  ======  =======
shape, rows               MKL     oneDNN  packed
=======================  ======  ======  =======
4864x896 (MLP), 1          1.45    0.81    0.56
4864x896 (MLP), 8          2.93    2.14    0.90
4864x896 (MLP), 16         3.82    2.94    1.60
151936x896 (Qwen head), 8   101      60      38
=======================  ======  ======  =======

A 16-row product costs 1.8x a 1-row one packed, against 3.6x in place: that is what lets a stage batch
many users' decode steps (``bench/pipeline.py``'s P3 rows). Prompt-sized products (512-2048 rows) are no
slower packed.

Packing copies the weight, so a stage would briefly hold two. ``pack_linears`` packs one block of rows at a
time (a head of 545 MB goes in ~32 MB blocks, each its own oneDNN product, the outputs joined) and hands
each block's original pages back to the OS as soon as its packed copy exists (the shard buffers are
anonymous mappings: ``azu.registry.manifest.read_verified_bytes``), so a stage's peak memory stays its
weights plus one block.

The results are the same up to float rounding (relative difference ~1e-7 per product, as between any two
GEMM implementations), so greedy tokens stay those of ``transformers`` and the verifier's tolerance covers
a worker and a verifier that use different kernels.

``"auto"`` packs float32 stages' linears on a CPU when this build of PyTorch has oneDNN and it answers a test
product correctly; ``"torch"`` (``AZU_CPU_KERNELS=torch``) keeps PyTorch's own linear everywhere.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "onednn")

# The row count oneDNN picks its blocked layout for. Measured on the 2-core AVX2 machine: a layout picked for
# 16 rows is the fastest or within noise of it for every product from 1 to 2048 rows.
PACK_FOR_ROWS = 16
# Fewer rows than this are padded with zero rows (see PackedLinear.forward).
PAD_TO_ROWS = 4
# Rows of a weight packed (and its original pages freed) at a time: at most this many bytes each.
BLOCK_BYTES = 32 << 20


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """A linear layer whose weight is held in oneDNN's blocked layout, in blocks of output rows.

    It has no ``weight`` parameter any more (the original's memory was given back): code that would read it
    fails loudly instead of reading freed pages.
    """

    def __init__(self, blocks: list[torch.Tensor], biases: list[torch.Tensor | None], in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.blocks = blocks  # oneDNN tensors: not parameters (no state dict, no autograd)
        self.biases = biases
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows < PAD_TO_ROWS:
            # oneDNN runs 1 or 2 rows on a slower kernel than 3 or more (measured on weights that do not fit
            # in the cache: 4864x896 takes 1.17 ms for 1 row, 1.41 for 2, 0.88 for 4): zero rows make the
            # product faster, and each real row's result does not depend on the other rows.
            padded = x.new_zeros(PAD_TO_ROWS, self.in_features)
            padded[:rows] = x.reshape(rows, self.in_features)
            return self._products(padded)[:rows].reshape(*x.shape[:-1], self.out_features)
        return self._products(x)

    def _products(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return _product(x, self.blocks[0], self.biases[0])
        # Into one output, block by block: not the blocks' outputs and their concatenation at once (a
        # verifier's 2048-position prefill through a Qwen head would hold 1.2 GB of logits twice).
        out = x.new_empty(*x.shape[:-1], self.out_features)
        first = 0
        for w, b in zip(self.blocks, self.biases, strict=True):
            part = _product(x, w, b)
            out[..., first:first + part.shape[-1]] = part
            first += part.shape[-1]
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={len(self.blocks)}"


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` whose product runs on oneDNN with the weight as it is (no packed copy): for a weight
    another module also reads (a head tied to the embeddings on the same stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(x, self.weight, self.bias)


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


def use_onednn(kernels: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a stage on ``device`` in ``dtype`` runs its linears on oneDNN, given the ``kernels`` choice."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; use one of {', '.join(KERNELS)}")
    if kernels == "torch" or device.type != "cpu":
        return False
    if dtype != torch.float32:
        return False  # bfloat16/float16 on a CPU: not measured, left on torch's path
    return onednn_works()


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``t`` can touch, from its first element to its last (a strided view's gaps included)."""
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def pack_linears(model: nn.Module, release: Callable[[torch.Tensor], object]) -> int:
    """Replace every plain float32 ``nn.Linear`` of ``model`` whose weight is loaded by a ``PackedLinear``;
    how many were replaced. ``release(t)`` is called with each block of original weight rows once its packed
    copy exists; it may hand those rows' pages back to the OS.

    A weight another tensor of the model shares memory with (a head tied to the embeddings on one stage), or
    a linear module the model holds in two places, is not packed: its pages are still read. It runs on oneDNN
    as it is (``OneDnnLinear``). A strided weight (a view into a fused tensor) stays on torch's linear:
    packing would keep two copies, since only whole tensors' pages can be given back.
    """
    slots: dict[int, int] = {}  # how many (parent, name) places hold each module
    for _, module in model.named_modules(remove_duplicate=False):
        slots[id(module)] = slots.get(id(module), 0) + 1
    owners: dict[int, int] = {}  # how many module slots hold each tensor (2 or more: tied)
    ranges: dict[int, tuple[int, int]] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and not t.is_meta and t.numel():
                owners[id(t)] = owners.get(id(t), 0) + 1
                ranges[id(t)] = _byte_range(t)

    def shared(weight: torch.Tensor) -> bool:
        if owners.get(id(weight), 0) > 1:
            return True
        start, end = ranges[id(weight)]
        return any(s < end and start < e for key, (s, e) in ranges.items() if key != id(weight))

    packed = 0
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            if type(module) is not nn.Linear:
                continue
            weight, bias = module.weight, module.bias
            if (weight.is_meta or weight.dtype != torch.float32 or not weight.numel()
                    or not weight.is_contiguous()):
                continue
            if slots[id(module)] > 1 or shared(weight):
                module.__class__ = OneDnnLinear
                continue
            rows = max(1, BLOCK_BYTES // max(1, weight.shape[1] * weight.element_size()))
            blocks: list[torch.Tensor] = []
            biases: list[torch.Tensor | None] = []
            with torch.inference_mode():
                for first in range(0, weight.shape[0], rows):
                    part = weight[first:first + rows]
                    blocks.append(torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), PACK_FOR_ROWS))
                    biases.append(None if bias is None else bias[first:first + rows].clone())
                    release(part)
            setattr(parent, name, PackedLinear(blocks, biases, module.in_features, module.out_features))
            packed += 1
    return packed
