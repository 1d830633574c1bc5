"""What a stage commits to: for each output row (a position's hidden state, or on the last stage one step's
logits), the ``TOP_K`` entries of largest magnitude, as (index, value) pairs, per chunk of ``CHUNK`` rows.

Why this shape (after TOPLOC, which commits to the top-k of hidden states per 32 tokens): it is small (8 pairs
of int32 + float32 per row: 2 KB per 32 rows, against 115 KB for the rows of a 896-wide model), a stage can
make it as each row is produced (decode makes one row per step), and it tolerates the numeric noise between
one prefill and step-by-step decode, or two batch shapes: the verifier, who re-computes the whole rows, looks
every committed index up in its own row and accepts a value within ``rtol`` of the row's scale, and accepts
an index as "top" when its magnitude is within the same margin of the k-th largest. Zeros, noise, an input
passed through, fewer layers or another model's weights move the top entries by far more than numeric noise.

A commitment says nothing about the entries outside the top-k; a worker that commits honestly but *sends*
different numbers is caught by the hand-over evidence instead (azu.verification.verifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from azu.errors import InvalidRequest

if TYPE_CHECKING:  # the collector (no torch in the core image) only reads a commitment's shape
    import numpy as np
    import torch

TOP_K = 8
CHUNK = 32


@dataclass(frozen=True)
class RowCommitment:
    """Committed (index, value) pairs of ``n`` rows: ``indices`` and ``values`` are ``[n, k]``."""

    indices: np.ndarray  # int32
    values: np.ndarray  # float32

    @property
    def rows(self) -> int:
        return int(self.indices.shape[0])

    def pack(self) -> bytes:
        n, k = self.indices.shape
        return msgpack.packb({"n": n, "k": k, "i": self.indices.astype("<i4").tobytes(),
                              "v": self.values.astype("<f4").tobytes()}, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> RowCommitment:
        import numpy as np

        n, k, i, v = _fields(data)
        return cls(np.frombuffer(i, "<i4").reshape(n, k).copy(), np.frombuffer(v, "<f4").reshape(n, k).copy())

    @classmethod
    def concat(cls, parts: list[RowCommitment]) -> RowCommitment:
        import numpy as np

        if not parts:
            return cls(np.zeros((0, TOP_K), "<i4"), np.zeros((0, TOP_K), "<f4"))
        return cls(np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]))


def _fields(data: Any) -> tuple[int, int, bytes, bytes]:
    try:
        # One map of four fields (a stranger's bytes: nothing else is built, azu.network.wire.Limits).
        d = msgpack.unpackb(data, raw=False, max_map_len=4, max_array_len=0, max_ext_len=0, max_str_len=64,
                            object_hook=_one_map())
        n, k, i, v = d["n"], d["k"], d["i"], d["v"]
        if not (isinstance(n, int) and isinstance(k, int) and n >= 0 and 0 < k <= 1024
                and isinstance(i, bytes) and isinstance(v, bytes) and len(i) == len(v) == 4 * n * k):
            raise ValueError("sizes do not agree")
        return n, k, i, v
    except Exception as exc:  # a stranger's bytes
        raise InvalidRequest(f"malformed commitment: {exc}") from exc


def _one_map() -> Any:
    seen = 0

    def hook(value: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen > 1:
            raise ValueError("a map inside the commitment")
        return value

    return hook


def shape_of(data: bytes) -> tuple[int, int]:
    """(rows, k) of a packed commitment, checked: the collector's bound check, without torch or numpy."""
    n, k, _i, _v = _fields(data)
    return n, k


def commit_rows(rows: torch.Tensor, *, k: int = TOP_K) -> RowCommitment:
    """The commitment of ``rows`` (``[n, width]``, any float dtype)."""
    import torch
    rows = rows.detach().to("cpu", torch.float32).reshape(rows.shape[0], -1)
    k = min(k, rows.shape[1])
    idx = top_magnitudes(rows, k)
    vals = torch.gather(rows, 1, idx)
    return RowCommitment(idx.to(torch.int32).numpy(), vals.numpy())


# Rows at least this wide (a vocabulary's logits) take the block search of ``top_magnitudes``.
BLOCK = 128
BLOCK_SEARCH_WIDTH = 64 * BLOCK


def top_magnitudes(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's ``k`` entries of largest magnitude (``[n, k]``, largest first): what
    ``torch.topk(rows.abs(), k)`` gives, up to the order of equal magnitudes.

    The last stage commits to every step's logits, and ``torch.topk`` over a vocabulary of 151936 took 7.9%
    of that stage's time at 16 streams (one CPU thread: 366 us a row). Wide rows are searched in blocks
    instead: the ``k`` largest entries lie in the ``k`` blocks with the largest maxima (a block left out has
    ``k`` blocks at least as large before it, hence ``k`` larger entries), so only those blocks' entries are
    ranked: 74 us a row, 739 us for 8 rows against 2392 (``test_top_magnitudes_are_torchs_topk``)."""
    import torch

    n, width = rows.shape
    magnitudes = rows.abs()
    full = width // BLOCK
    if width < BLOCK_SEARCH_WIDTH or full < k:
        return torch.topk(magnitudes, k, dim=1).indices
    block_max = magnitudes[:, :full * BLOCK].view(n, full, BLOCK).amax(dim=2)
    if width > full * BLOCK:  # the last, shorter block
        block_max = torch.cat([block_max, magnitudes[:, full * BLOCK:].amax(dim=1, keepdim=True)], dim=1)
    blocks = torch.topk(block_max, k, dim=1).indices
    candidates = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(n, -1)
    past_end = candidates >= width  # in the last block, when it is shorter
    ranked = torch.gather(magnitudes, 1, candidates.clamp(max=width - 1)).masked_fill(past_end, -1.0)
    return torch.gather(candidates, 1, torch.topk(ranked, k, dim=1).indices)


@dataclass(frozen=True)
class Mismatch:
    """Where a commitment disagrees with the verifier's rows, and by how much (relative to the row)."""

    row: int
    what: str  # "value" | "index" | "rows"
    error: float  # the largest relative difference seen in that row

    def as_dict(self) -> dict[str, object]:
        return {"row": self.row, "what": self.what, "error": round(float(self.error), 6)}


def check_rows(commitment: RowCommitment, reference: torch.Tensor, *, rtol: float,
               seen: list[float] | None = None) -> Mismatch | None:
    """None if ``commitment`` could have been made from ``reference`` (``[n, width]``) within ``rtol``
    (relative to each row's largest magnitude); else the first row that disagrees. ``seen`` gets the largest
    relative difference found (how close to the tolerance an honest stage comes)."""
    import numpy as np
    import torch

    ref = reference.detach().to("cpu", torch.float32).reshape(reference.shape[0], -1)
    if commitment.rows != ref.shape[0]:
        return Mismatch(min(commitment.rows, ref.shape[0]), "rows", float("inf"))
    if commitment.rows == 0:
        return None
    k = commitment.indices.shape[1]
    idx = torch.from_numpy(commitment.indices.astype(np.int64))
    if int(idx.min()) < 0 or int(idx.max()) >= ref.shape[1]:
        return Mismatch(0, "index", float("inf"))
    vals = torch.from_numpy(commitment.values.astype(np.float32))
    mags = ref.abs()
    scale = mags.max(dim=1).values.clamp_min(1e-30)  # [n]
    kth = torch.topk(mags, k, dim=1).values[:, -1]  # [n]
    at = torch.gather(ref, 1, idx)
    value_err = ((vals - at).abs().max(dim=1).values / scale)  # [n]
    index_err = ((kth.unsqueeze(1) - at.abs()).clamp_min(0).max(dim=1).values / scale)  # [n]
    bad_value = value_err > rtol
    bad_value |= ~torch.isfinite(vals).all(dim=1)
    bad_index = index_err > rtol
    bad = bad_value | bad_index
    if seen is not None:
        seen.append(float(torch.maximum(value_err, index_err).max()))
    if not bool(bad.any()):
        return None
    row = int(torch.nonzero(bad)[0])
    what = "value" if bool(bad_value[row]) else "index"
    return Mismatch(row, what, float(max(value_err[row], index_err[row])))


def rows_close(rows: torch.Tensor, reference: torch.Tensor, *, rtol: float) -> Mismatch | None:
    """Full rows against full rows (the hand-over evidence): None if every entry is within ``rtol`` of the
    reference row's largest magnitude."""
    import torch

    a = rows.detach().to("cpu", torch.float32).reshape(rows.shape[0], -1)
    b = reference.detach().to("cpu", torch.float32).reshape(reference.shape[0], -1)
    if a.shape != b.shape:
        return Mismatch(min(a.shape[0], b.shape[0]), "rows", float("inf"))
    scale = b.abs().max(dim=1).values.clamp_min(1e-30)
    err = (a - b).abs().max(dim=1).values / scale
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    bad = err > rtol
    if not bool(bad.any()):
        return None
    row = int(torch.nonzero(bad)[0])
    return Mismatch(row, "value", float(err[row]))


class CommitBuffer:
    """A stage's commitments for one job's epoch: rows committed as they are produced, sent a chunk at a time
    (worker side, azu.network.node)."""

    def __init__(self) -> None:
        self.parts: list[RowCommitment] = []
        self.pending = 0  # rows committed, not yet sent
        self.sent = 0  # rows sent

    def add(self, rows: torch.Tensor) -> None:
        c = commit_rows(rows.reshape(rows.shape[0] if rows.ndim > 1 else 1, -1))
        self.parts.append(c)
        self.pending += c.rows

    def take(self, *, final: bool) -> list[tuple[int, RowCommitment]]:
        """(first row, commitment) of each whole chunk ready, and with ``final`` the rest (possibly empty)."""
        if self.pending < CHUNK and not final:
            return []
        rows = RowCommitment.concat(self.parts)
        out: list[tuple[int, RowCommitment]] = []
        start = 0
        while rows.rows - start >= CHUNK or (final and (start < rows.rows or not out)):
            end = min(start + CHUNK, rows.rows)
            out.append((self.sent + start, RowCommitment(rows.indices[start:end], rows.values[start:end])))
            start = end
            if start >= rows.rows:
                break
        rest = RowCommitment(rows.indices[start:], rows.values[start:])
        self.parts = [rest] if rest.rows else []
        self.pending = rest.rows
        self.sent += start
        return out
