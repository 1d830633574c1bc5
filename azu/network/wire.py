"""What travels between the API, the scheduler and the workers: step payloads, routes and tensors.

A step payload is a msgpack map (``StepPayload.pack``); a hidden state travels inside it as ``safetensors``
bytes (``{"x": t}``). Nothing here ever unpickles, and ``StepPayload.unpack`` checks every field's type:
workers are strangers to each other, and anyone who can reach a queue can put bytes on it.

``Hop`` lives here, not in placement: placement plans routes, but a route is something that travels (in every
step payload, in end_job messages, in the job's record) and has to be parsed from a stranger's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from azu.engine.span import Span
from azu.errors import InvalidRequest
from azu.network.dispatch import worker_queue

if TYPE_CHECKING:
    import torch


# --- tensors ------------------------------------------------------------------------------------
def pack_tensor(t: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"x": t.detach().contiguous().cpu()})


def unpack_tensor(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    try:
        return load(bytes(data))["x"]
    except Exception as exc:  # malformed bytes from a stranger: a clear refusal, not a crash
        raise InvalidRequest(f"tensor payload is not valid safetensors bytes with key 'x': {exc}") from exc


# --- checking what a stranger sent --------------------------------------------------------------
def _int(value: Any, what: str, *, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidRequest(f"malformed step payload: {what} must be an integer >= {low}, got {value!r}")
    return value


def _float(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(f"malformed step payload: {what} must be a finite number, got {value!r}")
    return float(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"malformed step payload: {what} must be a non-empty string")
    return value


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"malformed step payload: {what} must be a list of token ids")
    return [_int(v, what) for v in value]


def _fields(value: Any, names: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"malformed step payload: {what} must be a map")
    if set(value) != set(names):
        raise InvalidRequest(f"malformed step payload: {what} must have exactly the fields "
                             f"{', '.join(names)}")
    return dict(value)


# --- routes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hop:
    """One layer group of a route: the worker (and its queue) that runs ``span`` of the model."""

    worker_id: str
    span: Span

    @property
    def queue(self) -> str:
        return worker_queue(self.worker_id)

    def to_list(self) -> list[Any]:
        return [self.worker_id, *self.span.to_list()]

    @classmethod
    def from_list(cls, value: Any) -> Hop:
        if not isinstance(value, list | tuple) or len(value) != 5 or not isinstance(value[0], str):
            raise InvalidRequest(f"malformed route hop {value!r}")
        return cls(value[0], Span.from_list(list(value[1:])))


def route_from_list(value: Any) -> tuple[Hop, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequest("malformed step payload: route must be a non-empty list of hops")
    return tuple(Hop.from_list(h) for h in value)


# --- sampling -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How a job's tokens are chosen and when it stops: fixed at submit, carried by every step."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]  # stop strings (the last stage checks them)
    stop_ids: tuple[int, ...]  # stop token ids (the model's eos ids unless the request named others)
    prompt_len: int

    FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_ids", "prompt_len")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"], d["stop_ids"] = list(self.stop), list(self.stop_ids)
        return d

    @classmethod
    def from_dict(cls, value: Any) -> Sampling:
        d = _fields(value, cls.FIELDS, "gen")
        stop = d["stop"]
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("malformed step payload: gen.stop must be a list of strings")
        return cls(max_tokens=_int(d["max_tokens"], "gen.max_tokens", low=1),
                   temperature=_float(d["temperature"], "gen.temperature"),
                   top_p=_float(d["top_p"], "gen.top_p"), top_k=_int(d["top_k"], "gen.top_k"),
                   seed=_int(d["seed"], "gen.seed"), stop=tuple(stop),
                   stop_ids=tuple(_ids(d["stop_ids"], "gen.stop_ids")),
                   prompt_len=_int(d["prompt_len"], "gen.prompt_len"))


# --- step payloads ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPayload:
    """One step of a job at one hop of its route: what it feeds the hop's stage, and where it stands.

    ``x`` is the token ids the first hop embeds (the prompt at step 0, then the last token) or, for every
    later hop, the previous hop's hidden state as safetensors bytes. ``pos`` is the position the hop's KV
    cache must have reached; ``token`` is the job's HMAC token over its id and route (azu.network.auth).
    """

    job_id: str
    model_id: str
    route: tuple[Hop, ...]
    token: str
    sampling: Sampling
    step: int
    hop: int
    pos: int
    x: list[int] | bytes

    # The msgpack field names: short, and the same since the first release.
    _KEYS = ("job", "model", "route", "tok", "gen", "step", "hop", "pos", "x")

    @property
    def here(self) -> Hop:
        """The hop this payload is for (``unpack`` checked it is on the route)."""
        return self.route[self.hop]

    def pack(self) -> bytes:
        return msgpack.packb({
            "job": self.job_id, "model": self.model_id, "route": [h.to_list() for h in self.route],
            "tok": self.token, "gen": self.sampling.to_dict(), "step": self.step, "hop": self.hop,
            "pos": self.pos, "x": self.x}, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> StepPayload:
        """The payload in ``data``; InvalidRequest if it is not exactly a well-typed step payload."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise InvalidRequest(f"step payload is not valid msgpack: {exc}") from exc
        d = _fields(raw, cls._KEYS, "step payload")
        x = d["x"]
        if not isinstance(x, bytes):
            x = _ids(x, "x")
            if not x:
                raise InvalidRequest("malformed step payload: x holds no token ids")
        route = route_from_list(d["route"])
        hop = _int(d["hop"], "hop")
        if hop >= len(route):
            raise InvalidRequest(f"malformed step payload: hop {hop} is not on the route")
        return cls(job_id=_str(d["job"], "job"), model_id=_str(d["model"], "model"), route=route,
                   token=_str(d["tok"], "tok"), sampling=Sampling.from_dict(d["gen"]),
                   step=_int(d["step"], "step"), hop=hop, pos=_int(d["pos"], "pos"), x=x)
