"""What travels between the API, the scheduler and the workers: step payloads, routes and tensors.

A step payload is a msgpack map (``StepPayload.pack``); a hidden state travels inside it as ``safetensors``
bytes (``{"x": t}``). Nothing here ever unpickles, and ``StepPayload.unpack`` checks every field's type:
workers are strangers to each other, and anyone who can reach a queue can put bytes on it.

``Hop`` lives here, not in placement: placement plans routes, but a route is something that travels (in every
step payload, in grants, in the job's record) and has to be parsed from a stranger's bytes.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from azu.engine.span import Span
from azu.errors import Forbidden, InvalidRequest, shown
from azu.network.dispatch import worker_queue

if TYPE_CHECKING:
    import torch


# --- tensors ------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32"}


def pack_tensor(t: torch.Tensor) -> bytes:
    """``{"x": t}`` in the safetensors format, built directly: byte-identical to ``safetensors.torch.save``
    and several times faster for the small states of decode (it is on every hop of every step)."""
    import torch

    t = t.detach().contiguous().cpu()
    code = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
    if code is None:
        from safetensors.torch import save

        return save({"x": t})
    size = t.numel() * t.element_size()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if size else b""
    return b"".join((_header(code, tuple(t.shape), size), data))


@functools.lru_cache(maxsize=256)
def _header(code: str, shape: tuple[int, ...], size: int) -> bytes:
    """The length-prefixed safetensors header of one tensor ``x`` (a decode step's is the same every step)."""
    header = json.dumps({"x": {"dtype": code, "shape": list(shape), "data_offsets": [0, size]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    return len(header).to_bytes(8, "little") + header


_SHORT_HEADER = 256  # bytes: a one-tensor header as pack_tensor writes it is ~70 (more dims, a few more)


def unpack_tensor(data: bytes) -> torch.Tensor:
    """The tensor ``x`` of safetensors bytes. Bytes as ``pack_tensor`` writes them (one tensor, its header
    byte for byte the one ``_header`` makes, the data exactly as long as it says) are read directly: on every
    hop of every step, where ``safetensors.torch.load`` cost several times as much; anything else goes through
    ``load`` (any valid file with a tensor ``x``) and is refused with a clear error if it is not valid."""
    import torch

    view = memoryview(data)
    if len(view) >= 8:
        length = int.from_bytes(view[:8], "little")
        if length <= _SHORT_HEADER and len(view) >= 8 + length:
            known = _known_header(bytes(view[8:8 + length]))
            if known is not None and len(view) == 8 + length + known[2]:
                dtype, shape, size = known
                if not size:
                    return torch.empty(shape, dtype=dtype)
                return torch.frombuffer(bytearray(view[8 + length:]), dtype=dtype).reshape(shape)
    from safetensors.torch import load

    try:
        return load(bytes(data))["x"]
    except Exception as exc:  # malformed bytes from a stranger: a clear refusal, not a crash
        raise InvalidRequest(f"tensor payload is not valid safetensors bytes with key 'x': {exc}") from exc


@functools.lru_cache(maxsize=256)
def _known_header(header: bytes) -> tuple[torch.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data bytes) if ``header`` is exactly one ``pack_tensor`` writes, else None. At most
    ``_SHORT_HEADER`` bytes each (a stranger's headers can only push others out of the cache)."""
    import torch

    try:
        meta = json.loads(header)
        x = meta["x"]
        code, shape, offsets = x["dtype"], tuple(x["shape"]), x["data_offsets"]
        dtype = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[code]
        if not all(type(d) is int and d >= 0 for d in shape) or type(offsets[1]) is not int:
            return None
        torch_dtype = getattr(torch, dtype)
        size = math.prod(shape) * torch_dtype.itemsize
        if _header(code, shape, size)[8:] != header:  # a copy of what pack_tensor writes, nothing else
            return None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return torch_dtype, shape, size


# --- checking what a stranger sent --------------------------------------------------------------
def _int(value: Any, what: str, *, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidRequest(f"malformed step payload: {what} must be an integer >= {low}, "
                             f"got {shown(value)}")
    return value


def _float(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(f"malformed step payload: {what} must be a finite number, got {shown(value)}")
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
            raise InvalidRequest(f"malformed route hop {shown(value)}")
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


# --- job grants -----------------------------------------------------------------------------------
GRANT_VERSION = 2  # 2: each hop's direct-path address (``direct``)


@dataclass(frozen=True)
class JobGrant:
    """What the core allows a job to do, signed by the core (``auth.GRANT``): which model (and manifest),
    along which route (each hop with its worker's public key), with which sampling, until when.

    Every step payload carries the grant's bytes and signature; a worker checks them once per grant."""

    job_id: str
    model_id: str
    manifest_sha256: str
    route: tuple[Hop, ...]
    public_keys: tuple[str, ...]  # hex, one per hop
    sampling: Sampling
    epoch: int
    expires_at: float
    # The first step of this epoch: a re-routed job's replay (a step from the core at hop 0, position 0,
    # carrying the prompt and the ``start`` tokens published so far); 0 for the first route.
    start: int = 0
    # Each hop's direct-path address (``P2P_PUBLIC_URL`` from its heartbeat; "" for none): where the hop
    # before sends its hand-overs, encrypted to the key above (azu.network.direct). Empty: none has one.
    direct: tuple[str, ...] = ()

    _KEYS = ("v", "job", "model", "manifest", "route", "gen", "epoch", "exp", "start", "direct")

    def pack(self) -> bytes:
        return msgpack.packb({
            "v": GRANT_VERSION, "job": self.job_id, "model": self.model_id, "manifest": self.manifest_sha256,
            "route": [[*h.to_list(), k] for h, k in zip(self.route, self.public_keys, strict=True)],
            "gen": self.sampling.to_dict(), "epoch": self.epoch, "exp": self.expires_at,
            "start": self.start, "direct": list(self.direct)}, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> JobGrant:
        d = _fields(_msgpack(data, "job grant", GRANT), cls._KEYS, "job grant")
        if d["v"] != GRANT_VERSION:
            raise InvalidRequest(f"job grant version {shown(d['v'])} is not {GRANT_VERSION}")
        hops = d["route"]
        if not isinstance(hops, list | tuple) or not hops:
            raise InvalidRequest("malformed job grant: route must be a non-empty list of hops")
        route, pubs = [], []
        for h in hops:
            if not isinstance(h, list | tuple) or len(h) != 6 or not isinstance(h[5], str):
                raise InvalidRequest(f"malformed job grant hop {shown(h)}")
            route.append(Hop.from_list(list(h[:5])))
            pubs.append(h[5])
        manifest = d["manifest"]
        if not isinstance(manifest, str):
            raise InvalidRequest("malformed job grant: manifest must be a string")
        direct = d["direct"]
        if not isinstance(direct, list | tuple) or len(direct) not in (0, len(route)) \
                or not all(isinstance(a, str) for a in direct):
            raise InvalidRequest("malformed job grant: direct must be one address (or \"\") per hop")
        return cls(job_id=_str(d["job"], "job"), model_id=_str(d["model"], "model"), manifest_sha256=manifest,
                   route=tuple(route), public_keys=tuple(pubs), sampling=Sampling.from_dict(d["gen"]),
                   epoch=_int(d["epoch"], "epoch"), expires_at=_float(d["exp"], "exp"),
                   start=_int(d["start"], "start"), direct=tuple(direct))

    def direct_of(self, hop: int) -> str:
        """Hop ``hop``'s direct-path address, "" if it has none."""
        return self.direct[hop] if hop < len(self.direct) else ""

    def key_of(self, worker_id: str) -> str | None:
        """The public key the grant names for ``worker_id`` (None if it is not on the route)."""
        for h, k in zip(self.route, self.public_keys, strict=True):
            if h.worker_id == worker_id:
                return k
        return None


# --- what a stranger's bytes may cost to read -----------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """How much reading one kind of message may build. MessagePack read without limits turns each byte of a
    stranger's message into an object: 16 MiB of empty maps is 1.1 GB of Python dicts, so one push of an
    enrolled worker onto another's inbox, or onto the core's report list, could take the reader's memory.
    Every reader here refuses a message past its kind's limits: its size and the length of any string; and,
    walking a message of more than ``SCAN_FROM`` bytes through its headers without building anything
    (``_scan``), how many values it holds and how deeply arrays and maps nest (arrays left open count as
    they are read: a hook that runs when a container is complete never sees them). Only then is it parsed;
    where a message may hold long lists (a prompt's token ids), ``Items`` caps the items of all the lists of
    one bundle together. What is left is about the message's own size (docs/security.md)."""

    max_bytes: int
    objects: int  # values of every kind, containers and map keys included
    depth: int  # arrays and maps inside one another, the outermost counted
    max_str: int  # bytes of any one string (text is short in every message; bytes may be long)


class Items:
    """A budget of list items shared by several reads (the step payloads of one bundle)."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int, what: str) -> None:
        self.left -= n
        if self.left < 0:
            raise InvalidRequest(f"{what}: more list items than a message may hold")


MAX_MESSAGE = 64 << 20  # one bundle (senders split larger hand-overs: azu.network.jobs.bundles)
MAX_HOPS = 256  # a route's hops: at least a layer each
MAX_STEPS = 4096  # step payloads in one bundle (azu.network.inbox.BATCH_MAX)
MAX_IDS = 1 << 20  # token ids of all the payloads of one bundle (a prompt, or one id a step)
MAX_STOP_IDS = 1024  # stop token ids of one job (they travel in its grant)

INBOX = Limits(MAX_MESSAGE, objects=2 * 3 + MAX_STEPS + 1, depth=2, max_str=1024)  # a bundle or an end order
PAYLOAD = Limits(MAX_MESSAGE, objects=2 * 7 + MAX_IDS + 1, depth=2, max_str=1024)  # the list: token ids
# Grant, route, hop; its longest strings: the stop strings (jobs.MAX_STOP_CHARS characters).
GRANT = Limits(16 << 20, objects=MAX_HOPS * 8 + MAX_STOP_IDS + 256, depth=3, max_str=64 << 10)
# Reports of every kind: a heartbeat's stages, an evidence report's kept bundles (a job's whole answer),
# a commitment.
REPORT = Limits(512 << 20, objects=1 << 18, depth=4, max_str=64 << 10)
# A Celery task's body as another worker's broker login may write it onto a worker's queue: (args, kwargs,
# embed), where the args of a wake-up are the bundles it carries.
TASK_BODY = Limits(MAX_MESSAGE, objects=MAX_STEPS + 256, depth=4, max_str=64 << 10)

# Smaller messages are parsed without the walk: each value takes at least one byte, so one of these can
# build at most a few MB whatever it holds, and the walk would cost every hand-over of a decode step (a
# few KB) tens of microseconds, right after a forward, when every line of Python runs cold.
SCAN_FROM = 64 << 10

_ARRAY = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))  # MessagePack's array headers
_MAP = frozenset((*range(0x80, 0x90), 0xDE, 0xDF))  # and map headers
_INT = frozenset((*range(0x00, 0x80), *range(0xCC, 0xD4), *range(0xE0, 0x100)))  # and integers
_STR_LENGTH = {0xD9: 1, 0xDA: 2, 0xDB: 4}  # a string's header: the bytes of its length after it


def _scan(data: bytes, limits: Limits, *, arrays_of_ints: bool = False) -> None:
    """Walk ``data``'s headers, building nothing (msgpack's ``skip`` for everything but arrays and maps),
    and raise ValueError once it holds more objects, or nests deeper, than ``limits`` allow, or is not one
    whole message. ``arrays_of_ints``: an array may hold integers only."""
    # Read from a stream, a chunk at a time: fed whole, the walker would hold a copy of the message.
    walker = msgpack.Unpacker(io.BytesIO(data), max_buffer_size=max(1, len(data)), max_ext_len=0,
                              max_str_len=limits.max_str)
    left = [1]  # values still to read at each open level: the message itself, one value
    in_array = [False]  # whether that level is an array
    seen = 0
    while left:
        if not left[-1]:
            left.pop()
            in_array.pop()
            continue
        left[-1] -= 1
        seen += 1
        if seen > limits.objects:
            raise ValueError(f"more than {limits.objects} values")
        at = walker.tell()
        head = data[at]
        if arrays_of_ints and in_array[-1] and head not in _INT:
            raise ValueError("an array of something else than integers")
        if head in _ARRAY:
            n, array = walker.read_array_header(), True
        elif head in _MAP:
            n, array = 2 * walker.read_map_header(), False
        else:
            width = _STR_LENGTH.get(head)
            if width and int.from_bytes(data[at + 1:at + 1 + width], "big") > limits.max_str:
                raise ValueError(f"a string of more than {limits.max_str} bytes")  # before skip reads it
            walker.skip()
            continue
        if n:
            if len(left) > limits.depth:
                raise ValueError(f"arrays and maps nested more than {limits.depth} deep")
            left.append(n)
            in_array.append(array)
    if walker.tell() != len(data):
        raise ValueError("bytes after the message")


def _msgpack(data: Any, what: str, limits: Limits, *, ids: Items | None = None) -> Any:
    """``data`` parsed within ``limits``; InvalidRequest, with nothing built, if it exceeds them. ``ids``:
    the message's lists hold token ids only, counted against this budget."""
    if not isinstance(data, bytes):
        raise InvalidRequest(f"{what} must be bytes")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"{what} of {len(data)} bytes is larger than {limits.max_bytes}")

    def token_ids(value: list[Any]) -> list[Any]:
        assert ids is not None
        ids.take(len(value), what)
        if not all(type(v) is int for v in value):  # exactly int: a bool is not a token id
            raise ValueError("a list that is not of token ids")
        return value

    try:
        if len(data) > SCAN_FROM:
            _scan(data, limits, arrays_of_ints=ids is not None)
        hooks: dict[str, Any] = {"list_hook": token_ids} if ids is not None else {}
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_ext_len=0,
                               max_str_len=limits.max_str, **hooks)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"{what} is not valid msgpack within its limits: {exc}") from exc


def unpack_task_body(data: bytes) -> Any:
    """A Celery message body in MessagePack, read within ``TASK_BODY`` (workers/ registers it as Celery's
    msgpack decoder: anyone with a worker's login can put a message on another worker's queue)."""
    return _msgpack(data, "task body", TASK_BODY)


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise InvalidRequest(f"malformed message: {what} must be non-empty bytes")
    return value


# --- step payloads ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPayload:
    """One step of a job at one hop of its route: what it feeds the hop's stage, and where it stands.

    ``x`` is the token ids the first hop embeds (the prompt at step 0, then the last token) or, for every
    later hop, the previous hop's hidden state as safetensors bytes. ``pos`` is the position the hop's KV
    cache must have reached. ``grant``/``grant_sig``: the job's core-signed grant. Payloads travel in a
    ``StepBundle``, which their sender signs. ``grant_info`` is the parsed grant (not on the wire).
    """

    job_id: str
    step: int
    hop: int
    pos: int
    x: list[int] | bytes
    grant: bytes
    grant_sig: bytes
    grant_info: JobGrant | None = field(default=None, compare=False, repr=False)

    _KEYS = ("job", "step", "hop", "pos", "x", "grant", "gsig")

    @property
    def g(self) -> JobGrant:
        """The parsed grant (``unpack`` and ``with_grant`` set it)."""
        if self.grant_info is None:
            object.__setattr__(self, "grant_info", JobGrant.unpack(self.grant))
        assert self.grant_info is not None
        return self.grant_info

    @property
    def model_id(self) -> str:
        return self.g.model_id

    @property
    def route(self) -> tuple[Hop, ...]:
        return self.g.route

    @property
    def sampling(self) -> Sampling:
        return self.g.sampling

    @property
    def here(self) -> Hop:
        """The hop this payload is for (``unpack`` checked it is on the route)."""
        return self.g.route[self.hop]

    @property
    def end(self) -> int:
        """The position after the step's last: the epoch's first step (``g.start``) runs the prompt and the
        tokens published before, positions [0, prompt_len + start); step s > start runs position
        prompt_len + s - 1. A later hop may get the first step in parts (``pos`` inside it)."""
        return self.g.sampling.prompt_len + self.step

    def fits(self, rows: torch.Tensor) -> bool:
        """Whether ``rows`` (this payload's input, unpacked) are rows of positions from ``pos`` that the step
        holds: at least one, none past ``end`` (a 0-d tensor is no rows)."""
        return rows.ndim > 0 and 0 < rows.shape[0] <= self.end - self.pos

    def pack(self) -> bytes:
        return msgpack.packb({"job": self.job_id, "step": self.step, "hop": self.hop, "pos": self.pos,
                              "x": self.x, "grant": self.grant, "gsig": self.grant_sig}, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes, *, grants: Mapping[bytes, JobGrant] | None = None,
               fresh: dict[bytes, JobGrant] | None = None, ids: Items | None = None,
               check: Callable[[bytes, bytes], None] | None = None) -> StepPayload:
        """The payload in ``data``; InvalidRequest if it is not exactly a well-typed step payload.

        ``grants``: grants already parsed and verified, by their bytes (the reader adds a grant there once
        its signature is checked, never before: a stranger's unsigned grants must not stay). ``fresh``: the
        grants parsed meanwhile (a bundle's payloads often share one). ``ids``: the budget of token ids this
        payload's bundle has left (``StepBundle.payloads``). ``check(grant, signature)``: raises unless the
        core signed the grant; called before a grant not in ``grants`` is parsed (a stranger's grants cost
        a signature check each, not a parse)."""
        d = _fields(_msgpack(data, "step payload", PAYLOAD, ids=ids or Items(MAX_IDS)), cls._KEYS,
                    "step payload")
        x = d["x"]
        if not isinstance(x, bytes):
            x = _ids(x, "x")
            if not x:
                raise InvalidRequest("malformed step payload: x holds no token ids")
        grant, grant_sig = _bytes(d["grant"], "grant"), _bytes(d["gsig"], "gsig")
        info = grants.get(grant) if grants is not None else None
        if info is None:
            info = fresh.get(grant) if fresh is not None else None
        if info is None:
            if check is not None:
                check(grant, grant_sig)
            info = JobGrant.unpack(grant)
            if fresh is not None:
                fresh[grant] = info
        hop = _int(d["hop"], "hop")
        if hop >= len(info.route):
            raise InvalidRequest(f"malformed step payload: hop {hop} is not on the route")
        return cls(job_id=_str(d["job"], "job"), step=_int(d["step"], "step"), hop=hop,
                   pos=_int(d["pos"], "pos"), x=x, grant=grant, grant_sig=grant_sig,
                   grant_info=info)


@dataclass(frozen=True)
class StepBundle:
    """Step payloads one sender hands one worker at once, signed by the sender (``auth.STEPS`` over the
    SHA-256 of the packed sender and payloads): one signature per hand-over, not per step."""

    sender: str  # "core" or a worker id
    steps: tuple[bytes, ...]  # packed StepPayloads
    sig: bytes = b""

    def signed_part(self) -> bytes:
        import hashlib

        return hashlib.sha256(msgpack.packb([self.sender, list(self.steps)], use_bin_type=True)).digest()

    def pack(self) -> bytes:
        return msgpack.packb({"from": self.sender, "steps": list(self.steps), "sig": self.sig},
                             use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> StepBundle:
        return cls._from(_msgpack(data, "step bundle", INBOX))

    def payloads(self, *, grants: Mapping[bytes, JobGrant] | None = None,
                 check: Callable[[bytes, bytes], None] | None = None) -> list[StepPayload | Forbidden]:
        """The bundle's step payloads, parsed with one budget of token ids for all of them, each grant parsed
        once (``grants``, ``check``: as ``StepPayload.unpack``'s). A payload whose grant ``check`` refused
        is that refusal in its place (the other payloads stand); a malformed one raises for the bundle."""
        ids, fresh = Items(MAX_IDS), dict[bytes, JobGrant]()
        out: list[StepPayload | Forbidden] = []
        for packed in self.steps:
            try:
                out.append(StepPayload.unpack(packed, grants=grants, fresh=fresh, ids=ids, check=check))
            except Forbidden as exc:
                out.append(exc)
        return out

    @classmethod
    def _from(cls, raw: Any) -> StepBundle:
        d = _fields(raw, ("from", "steps", "sig"), "step bundle")
        steps = d["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(b, bytes) for b in steps):
            raise InvalidRequest("malformed step bundle: steps must be a non-empty list of bytes")
        return cls(sender=_str(d["from"], "from"), steps=tuple(steps), sig=_bytes(d["sig"], "sig"))


# --- reports (worker -> core) -------------------------------------------------------------------
REPORT_KINDS = ("token", "heartbeat", "loaded", "load_failed", "job_failed", "refused", "pong", "commit",
                "evidence")


@dataclass(frozen=True)
class Report:
    """What a worker tells the core (on its own ``azu:reports:from:<id>``), signed by it (``auth.REPORT``)."""

    worker_id: str
    kind: str
    body: dict[str, Any]
    sig: bytes = b""

    def signed_part(self) -> bytes:
        return msgpack.packb([self.worker_id, self.kind, self.body], use_bin_type=True)

    def pack(self) -> bytes:
        return msgpack.packb({"w": self.worker_id, "k": self.kind, "b": self.body, "sig": self.sig},
                             use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> Report:
        d = _fields(_msgpack(data, "report", REPORT), ("w", "k", "b", "sig"), "report")
        kind = d["k"]
        if kind not in REPORT_KINDS:
            raise InvalidRequest(f"unknown report kind {shown(kind)}")
        if not isinstance(d["b"], Mapping):
            raise InvalidRequest("malformed report: body must be a map")
        return cls(worker_id=_str(d["w"], "worker"), kind=kind, body=dict(d["b"]),
                   sig=_bytes(d["sig"], "sig"))


# --- end-of-job orders (core -> worker, in its inbox) ------------------------------------------
def end_order_part(job_id: str, epoch: int) -> bytes:
    """What the core signs (``auth.END_ORDER``) to tell workers a job is over."""
    return msgpack.packb([job_id, epoch], use_bin_type=True)


@dataclass(frozen=True)
class EndOrder:
    """The core's order to free a job's caches, as it travels in a worker's inbox beside step bundles (so
    a worker in the middle of other jobs takes it in its stride, instead of ending its session for a
    Celery message). Anyone who may write to the inbox can put one there; only the core's signature over
    ``end_order_part`` makes a worker act on it."""

    job_id: str
    epoch: int
    sig: bytes

    def pack(self) -> bytes:
        return msgpack.packb({"end": self.job_id, "epoch": self.epoch, "sig": self.sig}, use_bin_type=True)

    @classmethod
    def _from(cls, raw: Any) -> EndOrder:
        d = _fields(raw, ("end", "epoch", "sig"), "end order")
        return cls(job_id=_str(d["end"], "job id"), epoch=_int(d["epoch"], "epoch"),
                   sig=_bytes(d["sig"], "sig"))


def unpack_inbox(data: bytes) -> StepBundle | EndOrder:
    """What a worker found in its inbox: a step bundle (from a worker or the core) or an end order."""
    raw = _msgpack(data, "inbox message", INBOX)
    if isinstance(raw, Mapping) and "end" in raw:
        return EndOrder._from(raw)
    return StepBundle._from(raw)


def evidence_order_part(job_id: str, epoch: int) -> bytes:
    """What the core signs (``auth.EVIDENCE_ORDER``) to ask a worker for the bundles it kept for a job."""
    return msgpack.packb(["evidence", job_id, epoch], use_bin_type=True)
