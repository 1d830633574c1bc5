"""The linears' kernel on a CPU (azu.engine.kernels): oneDNN for float32 stages by default, PyTorch's own on
request; both give transformers' greedy tokens (the exact-match tests run the default for every family)."""

from __future__ import annotations

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
            if isinstance(m, nn.Linear) and not m.weight.is_meta]


def test_a_float32_cpu_stage_runs_its_linears_on_onednn_and_torch_on_request(built) -> None:
    b = built("llama")
    auto = Stage.load(b.shards, Span(0, 2, embeddings=True))
    plain = Stage.load(b.shards, Span(0, 2, embeddings=True), kernels="torch")
    assert _linears(auto) and set(_linears(auto)) == {kernels.OneDnnLinear}
    assert set(_linears(plain)) == {nn.Linear}
    # Modules of layers this stage does not hold stay on meta and are left alone.
    assert all(type(m) is nn.Linear for m in auto.model.modules()
               if isinstance(m, nn.Linear) and m.weight.is_meta)
    # Same parameters, nothing copied: the swapped module reads the very tensor that was loaded.
    swapped = next(m for m in auto.model.modules() if type(m) is kernels.OneDnnLinear)
    assert swapped.weight.data_ptr() == swapped.state_dict()["weight"].data_ptr()
    assert Stage.load(b.shards, Span(0, 2, embeddings=True), dtype="bfloat16").model is not None
    assert not kernels.use_onednn("auto", torch.device("cpu"), torch.bfloat16)
    assert not kernels.use_onednn("onednn", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="unknown kernels"):
        kernels.use_onednn("fast", torch.device("cpu"), torch.float32)


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
