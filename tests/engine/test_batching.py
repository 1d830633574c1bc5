"""Decode steps of several jobs run as one batch and still give each job generate's tokens."""

from __future__ import annotations

import pytest
import torch

from azu.cli import demo
from azu.engine.local import LocalPipeline
from azu.registry.sharder import shard_model
from tests.support.engine import decode_together

NO_SLIDING = {"sliding_window": None}


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {"use_sliding_window": False}),
        ("mixtral", NO_SLIDING),
        ("deepseek_v2", {}),
        ("gemma", {}),
        ("phi", {}),
        ("gemma2", {}),  # gemma2 has sliding layers: falls back to job-by-job
    ],
)
def test_batched_decode_matches_one_by_one(tmp_path, family, overrides):
    src = demo.build_model(family, tmp_path / "src", with_tokenizer=False, **overrides)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 2)
    expect_batched = family != "gemma2"
    assert all(stage._can_batch == expect_batched for stage in pipe.stages)

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, demo.VOCAB_SIZE, (n,), generator=gen).tolist() for n in (5, 17, 30, 9, 1)]
    alone = [pipe.generate(p, max_tokens=12).token_ids for p in prompts]

    nxt = {f"j{i}": torch.tensor(p) for i, p in enumerate(prompts)}
    got: dict[str, list[int]] = {k: [] for k in nxt}
    for k in list(nxt):  # prefill one by one (prompts differ in length)
        token = int(pipe.step(k, nxt[k]).argmax())
        got[k].append(token)
        nxt[k] = torch.tensor([token])
    for _ in range(11):
        decode_together(pipe.stages, list(nxt), nxt, got)
    assert [got[f"j{i}"] for i in range(len(prompts))] == alone
    assert pipe.stages[0].job_length("j0") == len(prompts[0]) + 11


def test_batch_refused_whole_when_cache_is_full(tmp_path):
    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 1, max_cached_tokens=3)
    stage = pipe.stages[0]
    stage.forward("a", torch.tensor([10, 11]))
    from azu.errors import CacheFull

    with pytest.raises(CacheFull):
        stage.forward_batch([("a", torch.tensor([12])), ("b", torch.tensor([13])), ("c", torch.tensor([14]))])
    assert stage.jobs == ["a"] and stage.job_length("a") == 2  # nothing half-applied


def test_rows_of_very_different_lengths_run_in_separate_batches():
    from azu.engine.stage import PART_SLACK, batch_parts

    assert batch_parts([30, 31, 29, 40], [1, 1, 1, 1]) == [[0, 1, 2, 3]]  # alike: one batch, in order
    assert batch_parts([0, 3, 9], [16, 1, 1]) == [[0, 1, 2]]  # short caches: padding within the slack
    # One long job beside short ones: 4 rows of 2001 columns would be mostly padding.
    assert batch_parts([20, 2000, 25, 22], [1, 1, 1, 1]) == [[0, 2, 3], [1]]
    assert batch_parts([20, 2000, 25, 1990], [1, 1, 1, 1]) == [[0, 2], [1, 3]]
    assert batch_parts([0, 32000], [1, 1]) == [[0], [1]]  # a pair too: a short job beside a long one
    assert batch_parts([5, 5 + PART_SLACK], [1, 1]) == [[0, 1]]


def test_a_long_job_decoding_beside_short_ones_gets_rows_of_its_own(tmp_path):
    """A job hundreds of positions long decodes in the same forward_batch as three short ones: the short jobs'
    rows are not stretched to its length, and every job still gets generate's tokens."""
    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 1)
    stage = pipe.stages[0]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(7, demo.VOCAB_SIZE, (n,), generator=gen).tolist() for n in (4, 400, 6, 5)]
    alone = [pipe.generate(p, max_tokens=6).token_ids for p in prompts]
    keys = [f"j{i}" for i in range(len(prompts))]
    nxt = {k: torch.tensor([int(stage.forward(k, torch.tensor(p)).argmax())])
           for k, p in zip(keys, prompts, strict=True)}
    got = {k: [int(x)] for k, x in nxt.items()}
    for _ in range(5):
        outs = stage.forward_batch([(k, nxt[k]) for k in keys])
        for k, out in zip(keys, outs, strict=True):
            nxt[k] = torch.tensor([int(out.argmax())])
            got[k].append(int(nxt[k]))
    assert [got[k] for k in keys] == alone
    short = stage._jobs["j0"].rows
    assert short is not None and short.size == 3 and stage._jobs["j1"].rows is None
    assert all(t.shape[2] < 100 for t in short.keys.values())  # not 400 positions a row
