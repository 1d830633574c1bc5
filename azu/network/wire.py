"""What travels between the API, the scheduler and the workers: messages and tensors on the wire.

Messages are msgpack maps; a tensor travels as ``safetensors`` bytes (``{"x": t}``). Nothing here ever
unpickles: workers are strangers to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from azu.errors import InvalidRequest
from azu.network.dispatch import worker_queue

if TYPE_CHECKING:
    import torch

# --- tensors and messages -----------------------------------------------------------------------
def pack_tensor(t: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"x": t.detach().contiguous().cpu()})


def unpack_tensor(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    try:
        return load(bytes(data))["x"]
    except Exception as exc:  # malformed bytes from a stranger: a clear refusal, not a crash
        raise InvalidRequest(f"tensor payload is not valid safetensors bytes with key 'x': {exc}") from exc


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise InvalidRequest(f"message is not valid msgpack: {exc}") from exc
    if not isinstance(msg, dict):
        raise InvalidRequest("message must be a msgpack map")
    return msg


# --- routes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hop:
    """One layer group of a route: the worker (and its queue) holding layers ``[first, last)``."""

    worker_id: str
    first: int
    last: int
    embeddings: bool
    head: bool

    @property
    def queue(self) -> str:
        return worker_queue(self.worker_id)

    @property
    def layers(self) -> int:
        return self.last - self.first

    def to_list(self) -> list[Any]:
        return [self.worker_id, self.first, self.last, self.embeddings, self.head]

    @classmethod
    def from_list(cls, v: list[Any]) -> Hop:
        try:
            worker_id, first, last, emb, head = v
            return cls(str(worker_id), int(first), int(last), bool(emb), bool(head))
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed route hop {v!r}") from exc

    def stage_key(self, model_id: str) -> tuple[str, int, int, bool, bool]:
        return (model_id, self.first, self.last, self.embeddings, self.head)


