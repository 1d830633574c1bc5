"""Prompts run in chunks, batched with other jobs' decode steps, still give each job generate's tokens.

This is what a worker does under load (azu.network.node): a long prompt runs AZU_PREFILL_CHUNK tokens at a
time, each chunk in the same batch as the decode steps of the jobs already generating, so the KV cache and
the positions of every row must stay exact across chunk boundaries and padding.
"""

from __future__ import annotations

import pytest
import torch

from azu.cli import demo
from azu.engine.local import LocalPipeline
from azu.registry.sharder import shard_model


def _run_mixed(pipe: LocalPipeline, prompts: list[list[int]], max_tokens: int, chunk: int,
               start_every: int) -> dict[str, list[int]]:
    """Every round: one decode step of each generating job plus the next ``chunk`` tokens of each prompt
    in progress, all as one ``forward_batch`` per stage. Job i starts at round ``i * start_every``."""
    names = [f"j{i}" for i in range(len(prompts))]
    done_prompt = dict.fromkeys(names, 0)
    nxt: dict[str, torch.Tensor] = {}
    got: dict[str, list[int]] = {k: [] for k in names}
    rounds = 0
    while any(len(got[k]) < max_tokens for k in names):
        rows: list[tuple[str, torch.Tensor, bool]] = []  # (job, input, samples a token)
        for i, k in enumerate(names):
            if len(got[k]) >= max_tokens or rounds < i * start_every:
                continue
            if k in nxt:
                rows.append((k, nxt.pop(k), True))
            else:
                p = prompts[i]
                a = done_prompt[k]
                b = min(len(p), a + chunk)
                done_prompt[k] = b
                rows.append((k, torch.tensor(p[a:b]), b == len(p)))
        rounds += 1
        if not rows:
            continue
        xs = [x for _, x, _ in rows]
        for stage in pipe.stages:
            xs = stage.forward_batch([(k, x) for (k, _, _), x in zip(rows, xs, strict=True)])
        for (k, _, samples), logits in zip(rows, xs, strict=True):
            assert logits.shape == (demo.VOCAB_SIZE,) or logits.ndim == 1
            if samples:
                token = int(logits.argmax())
                got[k].append(token)
                nxt[k] = torch.tensor([token])
    return got


@pytest.mark.parametrize(
    ("family", "overrides", "chunk"),
    [(family, overrides, chunk)
     for family, overrides in [("llama", {}), ("qwen2", {"use_sliding_window": False}),
                               ("mixtral", {"sliding_window": None}), ("phi", {})]
     for chunk in (1, 4, 7)]
    + [("deepseek_v2", {}, 4), ("gemma", {}, 4)],
)
def test_chunked_prefill_mixed_with_decode_matches_generate(tmp_path, family, overrides, chunk):
    src = demo.build_model(family, tmp_path / "src", with_tokenizer=False, **overrides)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 2)
    assert all(stage._can_batch for stage in pipe.stages)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, demo.VOCAB_SIZE, (n,), generator=gen).tolist() for n in (5, 17, 30, 9, 1, 12)]
    alone = [pipe.generate(p, max_tokens=10).token_ids for p in prompts]
    got = _run_mixed(pipe, prompts, 10, chunk, start_every=2)
    assert [got[f"j{i}"] for i in range(len(prompts))] == [a[:10] for a in alone]
    assert pipe.stages[0].job_length("j2") == 30 + 9  # the last token is sampled, not fed back


def test_several_whole_prompts_in_one_batch(tmp_path):
    """All prompts arrive at once (many users starting together): one batch prefills them all."""
    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    shard_model(src, tmp_path / "shards", progress=False)
    pipe = LocalPipeline(tmp_path / "shards", 2)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(7, demo.VOCAB_SIZE, (n,), generator=gen).tolist() for n in (6, 6, 3, 11)]
    alone = [pipe.generate(p, max_tokens=8).token_ids for p in prompts]
    got = _run_mixed(pipe, prompts, 8, chunk=64, start_every=0)
    assert [got[f"j{i}"] for i in range(len(prompts))] == [a[:8] for a in alone]
