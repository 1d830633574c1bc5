"""The commitment's top-k search: wide rows (logits) take a block search that must pick what topk picks."""

from __future__ import annotations

import pytest
import torch

from azu.verification.commitment import BLOCK_SEARCH_WIDTH, check_rows, commit_rows, top_magnitudes


@pytest.mark.parametrize("width", [BLOCK_SEARCH_WIDTH, 32000, 32001, 151936, 896])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_top_magnitudes_are_torchs_topk(width: int, n: int) -> None:
    rows = torch.randn(n, width, generator=torch.Generator().manual_seed(width + n)) * 5
    # The largest magnitudes in places a block search could miss: the short last block, one block holding
    # several of them, the very first entry.
    rows[0, -1] = 1e4
    rows[0, 130:134] = torch.tensor([-9e3, 8e3, -7e3, 6e3])
    rows[-1, 0] = -2e4
    assert torch.equal(top_magnitudes(rows, 8), torch.topk(rows.abs(), 8, dim=1).indices)
    assert check_rows(commit_rows(rows), rows, rtol=1e-6) is None


def test_equal_magnitudes_and_nan_rank_as_in_torchs_topk() -> None:
    rows = torch.randn(3, 32000, generator=torch.Generator().manual_seed(1))
    rows[0, ::997] = 50.0  # 33 entries share the largest magnitude, some negative
    rows[0, 5::1994] = -50.0
    rows[1, [7, 9000, 31999]] = float("nan")
    got, ref = top_magnitudes(rows, 8), torch.topk(rows.abs(), 8, dim=1).indices
    assert len(set(got[0].tolist())) == 8 and torch.equal(rows[0, got[0]].abs(), rows[0, ref[0]].abs())
    assert set(got[1, :3].tolist()) == {7, 9000, 31999} == set(ref[1, :3].tolist())
    assert torch.equal(got[1, 3:], ref[1, 3:]) and torch.equal(got[2], ref[2])
