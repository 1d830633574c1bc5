"""Cheating workers, for the verification tests and bench/verification.py: a stage that returns something
cheaper than its layers' output. Test code only: nothing in azu/ can turn a cheat on.

Each kind is what an open network's worker could do to save compute while still answering:
- ``zeros``, ``noise``: hidden states of zeros / random numbers of the right scale
- ``identity``: its input handed on unchanged (no layer run)
- ``fewer_layers``: its layer group minus the last layer
- ``other_model``: its layers with other random weights of the same shapes
- ``wrong_token`` (last stage): one token in 50 replaced (the logits it commits to stay honest)
- ``frame`` (any stage but the last): commits to its honest output but *sends* other numbers to the next hop
  (the entries outside the committed top-k), to get the next hop blamed
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

HIDDEN_KINDS = ("zeros", "noise", "identity", "fewer_layers", "other_model")
KINDS = (*HIDDEN_KINDS, "wrong_token", "frame")


def corrupt_stage(stage: Any, kind: str, *, seed: int = 1) -> None:
    """Make ``stage`` (an azu.engine.stage.Stage) cheat in the hidden-state ways above."""
    if kind == "fewer_layers":
        layers = getattr(stage._base, stage.family.layers)
        setattr(stage._base, stage.family.layers, nn.ModuleList(list(layers)[:-1]))
        return
    if kind == "other_model":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in stage.model.parameters():
                if not p.is_meta and p.numel() > 1:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.float().std().to(p.dtype))
        return
    if kind not in ("zeros", "noise", "identity"):
        raise ValueError(kind)
    forward, forward_batch = stage.forward, stage.forward_batch

    def fake(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if kind == "zeros":
            return torch.zeros_like(out)
        if kind == "noise":
            return torch.randn_like(out) * out.std()
        return x.to(out.dtype) if x.is_floating_point() and x.shape == out.shape else out

    stage.forward = lambda job_id, x, **kw: fake(x, forward(job_id, x, **kw))
    stage.forward_batch = lambda items: [fake(x, o)
                                         for (_, x), o in zip(items, forward_batch(items), strict=True)]


def wrong_token_sampler(sample: Any, *, every: int = 50, at: int = 7) -> Any:
    """``azu.engine.sampling.sample`` that answers another token at one step in ``every``."""

    def cheat(logits: torch.Tensor, params: Any, *, seed: int, step: int) -> int:
        token = sample(logits, params, seed=seed, step=step)
        return (token + 1) % logits.numel() if step % every == at else token

    return cheat


def framing_pack(pack: Any) -> Any:
    """``pack_tensor`` that changes every entry but each row's 8 largest (what the commitment covers)."""

    def cheat(t: torch.Tensor) -> bytes:
        rows = t.detach().reshape(t.shape[0], -1).clone().float()
        top = rows.abs().topk(min(8, rows.shape[1]), dim=1).indices
        keep = torch.zeros_like(rows, dtype=torch.bool).scatter(1, top, True)
        noise = torch.randn_like(rows) * rows.std(dim=1, keepdim=True)
        return pack(torch.where(keep, rows, rows + noise).to(t.dtype).reshape(t.shape))

    return cheat


def install_from_env() -> None:
    """In a worker process (bench/verification.py starts cheaters this way): cheat as ``AZU_CHEAT`` says."""
    kind = os.environ.get("AZU_CHEAT")
    if not kind:
        return
    if kind in HIDDEN_KINDS:
        import azu.network.loading as loading

        open_stage = loading.open_stage

        def cheating_open_stage(*args: Any, **kwargs: Any) -> Any:
            stage, size = open_stage(*args, **kwargs)
            corrupt_stage(stage, kind)
            return stage, size

        loading.open_stage = cheating_open_stage  # type: ignore[assignment]
    elif kind == "wrong_token":
        import azu.engine.sampling as sampling

        sampling.sample = wrong_token_sampler(sampling.sample)  # type: ignore[assignment]
    elif kind == "frame":
        import azu.network.node as node

        node.pack_tensor = framing_pack(node.pack_tensor)  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown AZU_CHEAT {kind!r}; one of {', '.join(KINDS)}")
