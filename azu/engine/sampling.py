"""Next-token sampling on the last stage: greedy, temperature, top-k, top-p.

A sampled token is the Gumbel-max draw ``argmax(logits / T + g)`` over the tokens top-k and top-p allow, with
the Gumbel noise ``g`` drawn from a generator seeded by ``(seed, step)``. Two consequences:

- a replayed step (a redelivered task, a re-planned route) draws the same token from the same logits;
- a verifier that re-computes the logits can check a sampled token exactly as it checks a greedy one: the
  token's score must be the best, within a tolerance for the numeric noise between two devices or batch
  shapes (``token_matches``). An inverse-CDF draw (``torch.multinomial``) has no such margin to test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def gumbel_noise(vocab: int, *, seed: int, step: int) -> torch.Tensor:
    """The step's Gumbel noise, ``[vocab]`` float32 (the same on every machine: drawn on the CPU)."""
    u = torch.rand(vocab, generator=_generator(seed, step), dtype=torch.float64)
    return (-torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))).float()


def _allowed(scaled: torch.Tensor, params: SamplingParams, *, slack: float = 0.0) -> torch.Tensor:
    """Which tokens top-k and top-p let through (bool ``[vocab]``); ``slack`` widens both cuts (the
    verifier's tolerance: a token on the edge of the cut passes)."""
    allowed = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        allowed &= scaled >= kth - slack
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep tokens until the mass *before* them reaches top_p (the best token always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = before < params.top_p + slack
        allowed &= torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    return allowed


def scores(logits: torch.Tensor, params: SamplingParams, *, seed: int, step: int) -> torch.Tensor:
    """What the sampler maximises: the logits (greedy), or ``logits / T + gumbel`` with the cut tokens at
    ``-inf``."""
    logits = logits.detach().to("cpu", torch.float32).reshape(-1)
    if params.greedy:
        return logits
    scaled = logits / params.temperature
    noisy = scaled + gumbel_noise(scaled.numel(), seed=seed, step=step)
    return noisy.masked_fill(~_allowed(scaled, params), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, *, seed: int, step: int) -> int:
    """One token id from ``logits`` (shape ``[vocab]``).

    The scores are a float32 CPU vector, and NumPy's argmax over one is 10-20x faster than PyTorch's (one
    thread, AVX-512 Xeon: 3.5 against 47 us for 32000 entries, 9.5 against 219 us for 151936), on the last
    stage for every row of every step. Both return the first index of the largest value, NaN counting as
    the largest (``test_sample_takes_torchs_argmax``)."""
    return int(np.argmax(scores(logits, params, seed=seed, step=step).numpy()))


def token_matches(logits: torch.Tensor, token: int, params: SamplingParams, *, seed: int, step: int,
                  tolerance: float) -> bool:
    """Could ``token`` be what ``sample`` draws from logits within ``tolerance`` of ``logits``?

    ``tolerance`` is in logit units (the verifier scales it to the row): the token's score must be within
    ``tolerance / T`` of the best allowed score, and the token within the cuts widened by the same slack.
    Greedy: its logit within ``tolerance`` of the largest."""
    logits = logits.detach().to("cpu", torch.float32).reshape(-1)
    if not 0 <= token < logits.numel():
        return False
    if params.greedy:
        return bool(logits[token] >= logits.max() - tolerance)
    slack = tolerance / params.temperature
    scaled = logits / params.temperature
    noisy = scaled + gumbel_noise(scaled.numel(), seed=seed, step=step)
    best = noisy.masked_fill(~_allowed(scaled, params), float("-inf")).max()
    loose = _allowed(scaled, params, slack=slack)
    return bool(loose[token]) and bool(noisy[token] >= best - 2 * slack)
