"""Next-token sampling on the last stage: greedy, temperature, top-k, top-p.

Seeded per ``(seed, step)``: a replayed step (a redelivered task, a re-planned route) draws the same
token from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from azu.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → no top-k cut
    top_p: float = 1.0  # 1 → no nucleus cut

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest("temperature must be between 0 and 100", param="temperature")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be >= 0", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _generator(seed: int, step: int) -> torch.Generator:
    # Mix seed and step into one 63-bit value (splitmix-style constants) so nearby seeds/steps differ.
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


def sample(logits: torch.Tensor, params: SamplingParams, *, seed: int, step: int) -> int:
    """One token id from ``logits`` (shape ``[vocab]``)."""
    logits = logits.detach().to("cpu", torch.float32).reshape(-1)
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass *before* them already reaches top_p (the best token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=_generator(seed, step)))
