"""The linears' kernel on a CPU (azu.engine.kernels): oneDNN for float32 stages by default, PyTorch's own on
request; both give transformers' greedy tokens (the exact-match tests run the default for every family)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from azu.cli import demo
from azu.config import Settings, SettingsError
from azu.engine import kernels
from azu.engine.local import LocalPipeline
from azu.engine.span import Span
from azu.engine.stage import Stage
from tests.support.engine import NEW_TOKENS

pytestmark = pytest.mark.skipif(not kernels.onednn_works(), reason="this PyTorch has no oneDNN linear")


def _linears(stage: Stage) -> list[type]:
    return [type(m) for m in stage.model.modules()
            if isinstance(m, kernels.PackedLinear) or (isinstance(m, nn.Linear) and not m.weight.is_meta)]


def test_a_float32_cpu_stage_packs_its_linears_for_onednn_and_keeps_torchs_on_request(built) -> None:
    b = built("llama")
    auto = Stage.load(b.shards, Span(0, 2, embeddings=True))
    plain = Stage.load(b.shards, Span(0, 2, embeddings=True), kernels="torch")
    assert _linears(auto) and set(_linears(auto)) == {kernels.PackedLinear}
    assert len(_linears(auto)) == len(_linears(plain))
    assert set(_linears(plain)) == {nn.Linear}
    # Modules of layers this stage does not hold stay on meta and are left alone.
    assert all(type(m) is nn.Linear for m in auto.model.modules()
               if isinstance(m, nn.Linear) and m.weight.is_meta)
    # The packed module gives the plain one's products, up to float rounding; no weight is left to read.
    packed = next(m for m in auto.model.modules() if type(m) is kernels.PackedLinear)
    name = next(n for n, m in auto.model.named_modules() if m is packed)
    original = plain.model.get_submodule(name)
    x = torch.randn(3, 5, original.in_features)
    torch.testing.assert_close(packed(x), original(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(packed, "weight")
    assert Stage.load(b.shards, Span(0, 2, embeddings=True), dtype="bfloat16").model is not None
    assert not kernels.use_onednn("auto", torch.device("cpu"), torch.bfloat16)
    assert not kernels.use_onednn("onednn", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="unknown kernels"):
        kernels.use_onednn("fast", torch.device("cpu"), torch.float32)


def test_a_weight_packed_in_blocks_gives_the_same_products_and_frees_the_originals_pages(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 64 * 1024)  # 1000 rows of 64 floats: 4 blocks of 256
    model = nn.Sequential(nn.Linear(64, 1000), nn.Linear(1000, 8, bias=False))
    reference = copy.deepcopy(model)
    released: list[torch.Tensor] = []
    assert kernels.pack_linears(model, released.append) == 2
    assert len(model[0].blocks) == 4 and len(model[1].blocks) == 1
    assert [int(t.shape[0]) for t in released] == [256, 256, 256, 232, 8]
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-4)


def test_a_weight_something_else_reads_is_not_packed_nor_released() -> None:
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
    assert kernels.pack_linears(model, released.append) == 0 and not released
    # Read in place (oneDNN on the weight as it is, or torch's linear for the strided one): same products.
    assert {type(model[k]) for k in ("head", "view", "a")} == {kernels.OneDnnLinear}
    assert model["b"][0] is model["a"] and type(model["strided"]) is nn.Linear
    x = torch.randn(3, 16)
    for k in ("head", "view", "a", "strided"):
        torch.testing.assert_close(model[k](x), reference[k](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(demo.FAMILIES))
def test_both_kernels_give_generates_greedy_tokens(built, family: str) -> None:
    b = built(family)
    expected = b.reference()
    for choice in ("auto", "torch"):
        pipe = LocalPipeline(b.shards, 2, kernels=choice)
        assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == expected, choice


def test_the_kernel_setting_is_checked() -> None:
    assert Settings.from_env({}).worker.cpu_kernels == "auto"
    assert Settings.from_env({"AZU_CPU_KERNELS": "TORCH"}).worker.cpu_kernels == "torch"
    with pytest.raises(SettingsError, match="AZU_CPU_KERNELS"):
        Settings.from_env({"AZU_CPU_KERNELS": "cuda"})
