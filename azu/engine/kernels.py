"""Which matrix-multiply kernel a stage's linear layers use on a CPU.

On a CPU, PyTorch's ``F.linear`` goes to MKL's sgemm. For the shapes a pipeline stage runs (a few rows
against a large weight: decode steps, micro-batches) that is far from what the memory allows: on this
project's 2-core machine a Qwen2.5-0.5B head (151936 x 896, fp32) takes 31 ms for one row, 66 ms for two
(two matrix-vector passes) and 70 ms for eight. oneDNN's inner-product primitive, which PyTorch ships and
its own compiler uses for CPU linears (``torch.ops.mkldnn._linear_pointwise``), reads the same strided weight
in place, with no copy and no repacking, and takes about 20, 30 and 35 ms for those shapes
(``bench/engine.py`` prints the stage-level figures).

The results are the same up to float rounding (relative difference ~1e-7 per product, as between any two
GEMM implementations), so greedy tokens stay those of ``transformers`` and the verifier's tolerance covers
a worker and a verifier that use different kernels.

``"auto"`` uses oneDNN for float32 stages on a CPU when this build of PyTorch has it and it answers a test
product correctly; ``"torch"`` (``AZU_CPU_KERNELS=torch``) keeps PyTorch's own linear everywhere.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "onednn")


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` whose product runs on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether this PyTorch has oneDNN's linear and it gives ``F.linear``'s result on a small product."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2, 64, generator=gen)
        w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
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
    if kernels == "auto" and dtype != torch.float32:
        return False  # bfloat16/float16 on a CPU: not measured, left on torch's path
    return onednn_works()


def swap_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` whose weight is loaded (not on ``meta``) and dense run on
    oneDNN; how many were swapped. The modules keep their parameters: nothing is copied. (oneDNN reads the
    weight in place: a strided view, such as a slice of a fused tensor, stays on torch's linear.)"""
    swapped = 0
    for module in model.modules():
        if (type(module) is nn.Linear and not module.weight.is_meta and module.weight.is_contiguous()
                and (module.bias is None or module.bias.is_contiguous())):
            module.__class__ = OneDnnLinear
            swapped += 1
    return swapped
