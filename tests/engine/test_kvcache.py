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
    # A batch's temporary layer: the caller's padded buffer with room for the new columns, written in place.
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
        keys = list(nxt)
        xs = [nxt[k] for k in keys]
        for stage in pipe.stages:
            xs = stage.forward_batch(list(zip(keys, xs, strict=True)))
        for k, logits in zip(keys, xs, strict=True):
            nxt[k] = torch.tensor([int(logits.argmax())])
            got[k].append(int(nxt[k]))
    assert [got["j0"], got["j1"]] == alone


def test_a_batch_zeroes_its_padding_and_the_stage_frees_its_room_when_idle(tmp_path) -> None:
    from azu.metrics import kv_cache_bytes

    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 1)
    stage = pipe.stages[0]
    prompts = [[5, 9, 13], [7] * 20, [11] * 9]
    alone = [pipe.generate(p, max_tokens=6).token_ids for p in prompts]
    nxt = {f"j{i}": torch.tensor([int(pipe.step(f"j{i}", torch.tensor(p)).argmax())])
           for i, p in enumerate(prompts)}
    got = {k: [int(x)] for k, x in nxt.items()}
    for _ in range(5):
        # Whatever the kept memory held before (NaN here), a padded position must not reach a real row.
        with torch.inference_mode():  # the room is the stage's (inference) memory
            for room in stage._batch_room.values():
                room.fill_(float("nan"))
        keys = list(nxt)
        logits = stage.forward_batch([(k, nxt[k]) for k in keys])
        for k, out in zip(keys, logits, strict=True):
            nxt[k] = torch.tensor([int(out.argmax())])
            got[k].append(int(nxt[k]))
    assert [got[f"j{i}"] for i in range(3)] == alone
    kept = sum(int(t.nbytes) for t in stage._batch_room.values())
    assert kept and kv_cache_bytes(stage) > kept  # the jobs' buffers, and the batches' room
    for k in keys:
        stage.end_job(k)
    assert stage._batch_room == {} and kv_cache_bytes(stage) == 0
