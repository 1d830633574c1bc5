"""A stage's KV cache grows in place (azu.engine.kvcache): the same keys and values as transformers' own
concatenating layer, however the steps come, and generate's tokens past many growths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer

from azu.cli import demo
from azu.engine import kvcache
from azu.engine.local import LocalPipeline
from azu.registry.sharder import shard_model
from tests.support.engine import decode_together


def test_a_growing_layer_holds_what_concatenation_holds() -> None:
    gen = torch.Generator().manual_seed(0)
    grown, cat = kvcache.GrowingLayer(), DynamicLayer()
    for n in (7, 1, 1, 100, 1, 3, *([1] * 70)):  # a prompt, steps, a chunk: several growths
        k, v = torch.randn(2, 3, n, 8, generator=gen), torch.randn(2, 3, n, 8, generator=gen)
        got, want = grown.update(k, v), cat.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert grown.get_seq_length() == cat.get_seq_length()
    room = grown._room[0].shape[-2] if grown._room is not None else 0
    assert cat.get_seq_length() <= room <= cat.get_seq_length() * 5 // 4 + kvcache.GROW_MIN
    # Something else replaced the keys (a crop): the next step starts from them, not from the old buffer.
    grown.crop(-5)
    cat.crop(-5)
    k, v = torch.randn(2, 3, 1, 8, generator=gen), torch.randn(2, 3, 1, 8, generator=gen)
    got, want = grown.update(k, v), cat.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # A job's row of a batch's buffers, taken over when it runs alone: written in place.
    temp = kvcache.GrowingLayer()
    past = torch.randn(2, 3, 10, 8, generator=gen)
    buf_k, buf_v = torch.empty(2, 3, 12, 8), torch.empty(2, 3, 12, 8)
    buf_k[..., :10, :], buf_v[..., :10, :] = past, past
    temp.reserve(buf_k, buf_v, 2)
    assert temp.get_seq_length() == 10
    new = torch.randn(2, 3, 2, 8, generator=gen)
    keys, _ = temp.update(new, new)
    assert keys.data_ptr() == buf_k.data_ptr() and torch.equal(keys, torch.cat([past, new], dim=-2))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_and_batches_match_past_many_growths(tmp_path, family) -> None:
    src = demo.build_model(family, tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 2)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    steps = 3 * kvcache.GROW_MIN + 10
    prompts = [[5, 9, 13], [7] * 40]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False)
        want = out[0, len(prompt):].tolist()
        assert pipe.generate(prompt, max_tokens=steps).token_ids == want
    # The same jobs decoding as one batch, their caches growing at different steps.
    alone = [pipe.generate(p, max_tokens=steps).token_ids for p in prompts]
    nxt = {f"j{i}": torch.tensor([int(pipe.step(f"j{i}", torch.tensor(p)).argmax())])
           for i, p in enumerate(prompts)}
    got = {k: [int(x)] for k, x in nxt.items()}
    for _ in range(steps - 1):
        decode_together(pipe.stages, list(nxt), nxt, got)
    assert [got["j0"], got["j1"]] == alone


def test_jobs_decoding_together_keep_their_caches_as_one_batchs_rows(tmp_path) -> None:
    """A batch of the same jobs runs on their rows in place (no copy in, none out); a job that runs alone, a
    batch in another order, one with a job gone: each gives generate's tokens; memory is counted once and
    goes with the jobs."""
    from azu.metrics import kv_cache_bytes

    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 1)
    stage = pipe.stages[0]
    prompts = [[5, 9, 13], [7] * 20, [11] * 9]
    alone = [pipe.generate(p, max_tokens=14).token_ids for p in prompts]
    nxt = {f"j{i}": torch.tensor([int(pipe.step(f"j{i}", torch.tensor(p)).argmax())])
           for i, p in enumerate(prompts)}
    got = {k: [int(x)] for k, x in nxt.items()}

    def step(keys: list[str]) -> None:
        outs = stage.forward_batch([(k, nxt[k]) for k in keys])
        for k, out in zip(keys, outs, strict=True):
            nxt[k] = torch.tensor([int(out.argmax())])
            got[k].append(int(nxt[k]))

    def rows_of(key: str) -> kvcache.BatchRows | None:
        return stage._jobs[key].rows

    step(["j0", "j1", "j2"])
    rows = rows_of("j0")
    assert rows is not None and rows.size == 3 and rows_of("j2") is rows
    buffers = [t.data_ptr() for t in rows.keys.values()]
    own = stage._jobs["j1"].cache.layers[0]
    assert not own.is_initialized  # the job's own buffers went when it joined the rows
    assert kv_cache_bytes(stage) == sum(t.nbytes for t in [*rows.keys.values(), *rows.values.values()])
    for _ in range(3):
        step(["j2", "j0", "j1"])  # the same jobs in another order: the same rows, the same buffers
        assert rows_of("j1") is rows and [t.data_ptr() for t in rows.keys.values()] == buffers
    for idx, keys in rows.keys.items():  # every column finite: free room is zeros or some row's padding
        assert torch.isfinite(keys).all() and torch.isfinite(rows.values[idx]).all(), idx
    for _ in range(2):  # j1 alone: the rows disband, each job taking a copy of its row
        step(["j1"])
    assert rows_of("j1") is None and rows_of("j0") is None and rows_of("j2") is None
    for _ in range(3):  # back together: new rows, copied from the old rows and j1's own cache
        step(["j0", "j1", "j2"])
    assert rows_of("j0") is not rows
    stage.end_job("j0")  # the others leave its rows at once
    assert rows_of("j1") is None and rows_of("j2") is None
    for _ in range(4):  # a job gone: new rows of two
        step(["j2", "j1"])
    assert rows_of("j1").size == 2
    assert got["j0"] == alone[0][: len(got["j0"])] and len(got["j0"]) == 8
    assert got["j1"] == alone[1][: len(got["j1"])] and len(got["j1"]) == 14
    assert got["j2"] == alone[2][: len(got["j2"])] and len(got["j2"]) == 12
    assert kv_cache_bytes(stage) > 0
    for k in ("j1", "j2"):
        stage.end_job(k)
    assert kv_cache_bytes(stage) == 0


def _buffered_positions(stage, idx: int) -> int:
    """Positions of layer ``idx``'s key buffers held: rows x room of batch rows, a job's own room."""
    held: dict[int, int] = {}
    for job in stage._jobs.values():
        if job.rows is not None:
            keys = job.rows.keys[idx]
            held[keys.data_ptr()] = keys.shape[0] * keys.shape[2]
        elif job.cache.layers[idx]._room is not None:
            keys = job.cache.layers[idx]._room[0]
            held[keys.data_ptr()] = keys.shape[-2]
    return sum(held.values())


def _own_bound(stage) -> int:
    """What the stage's jobs would buffer each in a cache of its own."""
    return sum(j.length + max(kvcache.GROW_MIN, j.length // 4) for j in stage._jobs.values())


def test_batch_rows_hold_no_more_than_their_jobs_need(tmp_path) -> None:
    """Attacks on a worker's memory through batching (each would hold many times the positions that
    AZU_MAX_CACHED_TOKENS counts): one-token jobs batched in turn beside one long job, and jobs that ended or
    ran alone leaving the rows of a whole batch to one idle job."""
    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    stage = LocalPipeline(tmp_path / "shards", 1).stages[0]
    stage.forward("long", torch.full((400,), 9))
    for i in range(6):  # each pair would be a 2-row batch as long as the long job
        stage.forward_batch([("long", torch.tensor([9])), (f"b{i}", torch.tensor([9]))])
    assert _buffered_positions(stage, 0) <= _own_bound(stage)
    for k in stage.jobs:
        stage.end_job(k)

    keys = [f"j{i}" for i in range(8)]
    for k in keys:
        stage.forward(k, torch.full((200,), 9))
    for _ in range(2):
        stage.forward_batch([(k, torch.tensor([9])) for k in keys])
    assert stage._jobs["j0"].rows is not None and stage._jobs["j0"].rows.size == 8
    for k in keys[1:]:
        stage.end_job(k)  # j0 idles: it holds its own positions, not 8 rows
    assert _buffered_positions(stage, 0) <= _own_bound(stage) == 202 + kvcache.GROW_MIN
    stage.forward("j0", torch.tensor([9]))
    assert stage.job_length("j0") == 203
