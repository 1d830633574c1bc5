"""Decode steps of several jobs run as one batch and still give each job generate's tokens."""

from __future__ import annotations

import pytest
import torch

from azu.cli import demo
from azu.engine.local import LocalPipeline
from azu.registry.sharder import shard_model

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
        keys = list(nxt)
        xs = [nxt[k] for k in keys]
        for stage in pipe.stages:
            xs = stage.forward_batch(list(zip(keys, xs, strict=True)))
        for k, logits in zip(keys, xs, strict=True):
            token = int(logits.argmax())
            got[k].append(token)
            nxt[k] = torch.tensor([token])
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
