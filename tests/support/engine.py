"""Tiny models of every demo family for the engine tests (tests/engine), with transformers' own output."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from azu.cli import demo
from azu.registry.sharder import shard_model

PROMPT_LEN = 40  # longer than the demo families' sliding windows (16)
NEW_TOKENS = 24


class Built:
    """A tiny model of one family: its HF folder, its shard folders (single-file and sharded source)."""

    def __init__(self, family: str, root: Path) -> None:
        self.family = family
        self.src = demo.build_model(family, root / "src", with_tokenizer=False)
        self.src_sharded = demo.build_model(
            family, root / "src_sharded", with_tokenizer=False, max_shard_size="200KB"
        )
        self.shards = root / "shards"
        self.shards_from_sharded = root / "shards_from_sharded"
        shard_model(self.src, self.shards, progress=False)
        shard_model(self.src_sharded, self.shards_from_sharded, progress=False)
        self._reference: list[int] | None = None

    def prompt(self) -> list[int]:
        # Deterministic, varied ids away from the specials (0..6).
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(7, demo.VOCAB_SIZE, (PROMPT_LEN,), generator=gen).tolist()

    def reference(self) -> list[int]:
        """transformers' own greedy `generate` on the same weights."""
        if self._reference is None:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(self.src).eval()
            ids = torch.tensor([self.prompt()])
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
            self._reference = out[0, PROMPT_LEN:].tolist()
        return self._reference


def decode_together(stages: Iterable[Any], keys: list[str], nxt: dict[str, torch.Tensor],
                    got: dict[str, list[int]], after_stage: Callable[[Any], None] | None = None) -> None:
    """One greedy step of the jobs ``keys`` through ``stages`` as batches (``Stage.forward_batch``): each
    job's input from ``nxt``; its token appended to ``got[job]`` and put in ``nxt`` as the next input.
    ``after_stage(stage)`` runs after each stage's batch (checks)."""
    xs = [nxt[k] for k in keys]
    for stage in stages:
        xs = stage.forward_batch(list(zip(keys, xs, strict=True)))
        if after_stage is not None:
            after_stage(stage)
    for k, logits in zip(keys, xs, strict=True):
        token = int(logits.argmax())
        got[k].append(token)
        nxt[k] = torch.tensor([token])
