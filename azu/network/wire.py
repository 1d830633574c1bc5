"""What travels between the API, the scheduler and the workers, and how it is authenticated.

Messages are plain dicts packed with msgpack; a tensor travels as ``safetensors`` bytes (``{"x": t}``).
Nothing here ever unpickles: workers are strangers to each other.

Each job gets an HMAC token (``AUTH_SECRET_KEY``) over its id and its route, minted by whoever plans the
route. Every stage task checks it before touching a KV cache, so a message that names another job's cache,
or re-routes a job, is refused.

Sending is a seam (``Dispatcher``): azu/ must not import Celery, so the Celery app (``workers``) registers
the implementation when it is imported, and ``get_dispatcher()`` imports it on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from azu.errors import Forbidden, InvalidRequest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_DEV_SECRET = "azu-development-secret-not-for-production"
_warned_dev_secret = False


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


def worker_queue(worker_id: str) -> str:
    return f"gpu.{worker_id}"


def route_key(model_id: str, route: list[Hop]) -> str:
    """Canonical text of a route: what the job token signs besides the job id."""
    hops = ";".join(f"{h.worker_id}:{h.first}-{h.last}:{int(h.embeddings)}{int(h.head)}" for h in route)
    return f"{model_id}|{hops}"


def _secret() -> bytes:
    global _warned_dev_secret
    secret = os.environ.get("AUTH_SECRET_KEY") or ""
    if not secret:
        # A development network (tests, `azu up` without settings) still signs; production must set it.
        if not _warned_dev_secret:
            log.warning("AUTH_SECRET_KEY is not set: using the built-in development secret")
            _warned_dev_secret = True
        secret = _DEV_SECRET
    return secret.encode()


def job_token(job_id: str, model_id: str, route: list[Hop]) -> str:
    """HMAC-SHA256 over the job id and its route."""
    msg = f"{job_id}\n{route_key(model_id, route)}".encode()
    return hmac.new(_secret(), msg, hashlib.sha256).hexdigest()


def check_token(token: str | None, job_id: str, model_id: str, route: list[Hop]) -> None:
    """Raise Forbidden unless ``token`` is the job's token for exactly this route."""
    expected = job_token(job_id, model_id, route)
    if not isinstance(token, str) or not hmac.compare_digest(token, expected):
        raise Forbidden(f"job {job_id}: token does not match the job and its route")


# --- sending (the seam to Celery) ---------------------------------------------------------------
class Dispatcher(Protocol):
    def send_task(self, name: str, *, queue: str, args: list[Any] | tuple[Any, ...] = (),
                  kwargs: dict[str, Any] | None = None) -> None:
        """Enqueue task ``name`` on ``queue``; never waits for a result."""


_dispatcher: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    global _dispatcher
    _dispatcher = dispatcher


def get_dispatcher() -> Dispatcher:
    """The registered dispatcher; imports ``AZU_DISPATCHER`` (default: the Celery app ``workers``) once."""
    if _dispatcher is None:
        importlib.import_module(os.environ.get("AZU_DISPATCHER") or "workers")
    if _dispatcher is None:
        raise RuntimeError("no dispatcher registered (the workers package registers the Celery one)")
    return _dispatcher
