"""The shard folder's ``manifest.json``: what each file holds and the SHA-256 it must have.

Written by the sharder (``azu.registry.sharder``), read by stages and served by the registry. Every consumer
checks a file's hash *before* parsing it (``load_verified`` / ``read_verified_bytes``): shard files come
from strangers, and a safetensors parser should never see bytes nobody vouched for.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import math
import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from azu.errors import IntegrityFailure, InvalidRequest, NotFound
from azu.registry.download import CHUNK

if TYPE_CHECKING:
    import torch

FORMAT = "azu-shards/1"
MANIFEST_NAME = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
HEAD_FILE = "head.safetensors"

FileKind = Literal["embeddings", "layer", "head"]


def layer_file_name(index: int) -> str:
    return f"layer_{index:05d}.safetensors"


@dataclass(frozen=True)
class FileEntry:
    """One weight file of the shard folder."""

    name: str
    kind: FileKind
    layer: int | None
    sha256: str
    size: int
    tensors: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "sha256": self.sha256,
                "size": self.size, "tensors": list(self.tensors)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return cls(name=d["name"], kind=d["kind"], layer=d["layer"], sha256=d["sha256"], size=int(d["size"]),
                   tensors=tuple(d["tensors"]))


@dataclass(frozen=True)
class ExtraFile:
    """A non-weight file copied from the source (config, tokenizer files)."""

    name: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtraFile:
        return cls(name=d["name"], sha256=d["sha256"], size=int(d["size"]))


@dataclass
class Manifest:
    model_id: str
    source_revision: str | None
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_head: bool
    torch_dtype: str | None
    config: dict[str, Any]
    files: list[FileEntry]
    extra_files: list[ExtraFile] = field(default_factory=list)
    format: str = FORMAT
    # Where the manifest was loaded from (not serialized).
    directory: Path | None = field(default=None, compare=False)

    # -- lookup -------------------------------------------------------------------------------------
    def layer_file(self, index: int) -> FileEntry:
        for entry in self.files:
            if entry.kind == "layer" and entry.layer == index:
                return entry
        raise NotFound(f"manifest of {self.model_id} has no file for layer {index} "
                       f"(it has {self.num_layers} layers)")

    @property
    def embeddings_file(self) -> FileEntry:
        return self._single("embeddings")

    @property
    def head_file(self) -> FileEntry:
        return self._single("head")

    def _single(self, kind: FileKind) -> FileEntry:
        for entry in self.files:
            if entry.kind == kind:
                return entry
        raise NotFound(f"manifest of {self.model_id} has no {kind} file")

    def files_for(
        self, first_layer: int, last_layer: int, *, embeddings: bool, head: bool
    ) -> list[FileEntry]:
        """The files a stage holding layers ``[first_layer, last_layer)`` (plus embeddings/head) needs."""
        if not 0 <= first_layer <= last_layer <= self.num_layers:
            raise InvalidRequest(f"layer range [{first_layer}, {last_layer}) is outside the model's "
                                 f"{self.num_layers} layers")
        out = [self.embeddings_file] if embeddings else []
        out += [self.layer_file(i) for i in range(first_layer, last_layer)]
        if head:
            out.append(self.head_file)
        return out

    def entry(self, name: str) -> FileEntry | ExtraFile:
        """A weight or extra file by name (the registry serves both)."""
        entries: list[FileEntry | ExtraFile] = [*self.files, *self.extra_files]
        for e in entries:
            if e.name == name:
                return e
        raise NotFound(f"{name!r} is not a file of {self.model_id}")

    @property
    def total_weight_bytes(self) -> int:
        return sum(e.size for e in self.files)

    # -- (de)serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "model_id": self.model_id, "source_revision": self.source_revision,
            "architecture": self.architecture, "model_type": self.model_type, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "tied_head": self.tied_head,
            "torch_dtype": self.torch_dtype, "config": self.config,
            "files": [e.to_dict() for e in self.files],
            "extra_files": [e.to_dict() for e in self.extra_files],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def summary(self) -> dict[str, Any]:
        """What ``azu shard --json`` prints: the manifest without the per-tensor lists and the config."""
        d = self.to_dict()
        del d["config"]
        d["files"] = [{k: v for k, v in e.to_dict().items() if k != "tensors"} | {"tensors": len(e.tensors)}
                      for e in self.files]
        d["directory"] = str(self.directory) if self.directory else None
        d["total_weight_bytes"] = self.total_weight_bytes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, directory: Path | None = None) -> Manifest:
        if d.get("format") != FORMAT:
            raise InvalidRequest(f"unknown shard format {d.get('format')!r}; expected {FORMAT!r}")
        try:
            return cls(
                model_id=d["model_id"], source_revision=d.get("source_revision"),
                architecture=d["architecture"], model_type=d["model_type"], num_layers=int(d["num_layers"]),
                hidden_size=int(d["hidden_size"]), vocab_size=int(d["vocab_size"]),
                tied_head=bool(d["tied_head"]), torch_dtype=d.get("torch_dtype"), config=d["config"],
                files=[FileEntry.from_dict(e) for e in d["files"]],
                extra_files=[ExtraFile.from_dict(e) for e in d.get("extra_files", [])],
                directory=directory,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed manifest: {exc!r}") from exc

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no {MANIFEST_NAME} in {directory} (not an `azu shard` folder)") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, directory=Path(directory))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)  # atomic: a reader never sees half a manifest
        self.directory = Path(directory)
        return path


# -- hashing and verified reads -------------------------------------------------------------------------
def read_verified_bytes(
    path: str | os.PathLike[str], sha256: str, *, size: int | None = None
) -> bytearray | mmap.mmap:
    """The file's bytes; IntegrityFailure naming the file if its size or SHA-256 is not the promised one.

    The file is read once, into one buffer, and hashed as it is read: the bytes returned are the bytes
    that were hashed, so a file swapped on disk mid-way cannot slip through. The buffer is an anonymous
    private mapping (not a heap block), so whoever holds it can give parts of it back to the OS
    (``mmap.madvise(MADV_DONTNEED)``): a stage that repacks a weight into another layout frees the
    original's pages as it goes (``azu.engine.kernels``) instead of holding two copies.
    """
    p = Path(path)
    try:
        actual_size = p.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"shard file {p} is missing") from None
    # Size first: a truncated or padded file is refused without reading it.
    if size is not None and actual_size != size:
        raise IntegrityFailure(f"{p.name}: size {actual_size} bytes, manifest says {size}", param=p.name)
    # Private: MADV_DONTNEED frees a private anonymous page; on a shared one (mmap's default) it would not.
    buf: bytearray | mmap.mmap = bytearray()
    if actual_size:
        buf = mmap.mmap(-1, actual_size, flags=mmap.MAP_PRIVATE)
    view = memoryview(buf)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        done = 0
        while done < actual_size:
            n = f.readinto(view[done:done + CHUNK])
            if not n:
                raise IntegrityFailure(f"{p.name}: file shrank while being read", param=p.name)
            h.update(view[done:done + n])
            done += n
    view.release()  # an exported view would keep the mapping from being unmapped once its tensors go
    digest = h.hexdigest()
    if digest != sha256.lower():
        raise IntegrityFailure(f"{p.name}: SHA-256 {digest} does not match the manifest's {sha256}",
                               param=p.name)
    return buf


def load_verified(directory: str | os.PathLike[str], entry: FileEntry) -> dict[str, torch.Tensor]:
    """Load one shard file's tensors after checking its size and SHA-256 against ``entry``.

    The tensors are views into the very buffer that was hashed (no second copy, so a stage's peak
    memory stays near its weights).
    """
    return _load_verified(directory, entry)[1]


def _load_verified(
    directory: str | os.PathLike[str], entry: FileEntry
) -> tuple[bytearray | mmap.mmap, dict[str, torch.Tensor]]:
    buf = read_verified_bytes(Path(directory) / entry.name, entry.sha256, size=entry.size)
    tensors = _parse_safetensors(buf, entry.name)
    if set(tensors) != set(entry.tensors):
        raise IntegrityFailure(f"{entry.name}: tensors {sorted(tensors)} differ from the manifest's list",
                               param=entry.name)
    return buf, tensors


@dataclass
class _Loaded:
    """A mapping ``LoadedFiles`` holds weakly, and where its bytes can be read again: a file's verified bytes
    (byte ``i`` is the file's byte ``i``), or the cast copies of some of a file's tensors (``segments``)."""

    base: int  # the mapping's address
    size: int
    buffer: weakref.ref[mmap.mmap]
    path: Path | None = None  # a file read whole
    # A cast copy: (first byte in the mapping, bytes, the file, the source's first byte there, its dtype).
    segments: list[tuple[int, int, Path, int, torch.dtype]] = field(default_factory=list)


class LoadedFiles:
    """Shard files loaded as with ``load_verified``, whose buffers can then be given back page by page, and
    read again.

    A stage that copies a weight into another layout (``azu.engine.kernels.apply_plan``) calls
    :meth:`release` with the original once the copy exists: the pages wholly inside it go back to the OS
    (``MADV_DONTNEED`` on the anonymous mapping; they would read as zeros, so the caller must hold no other
    reader of them). The mappings themselves go when their last tensor does: this object holds them weakly,
    so a file whose tensors were all replaced is unmapped as soon as they are dropped, not when the whole
    stage has loaded (a float32 stage from bfloat16 files peaked at 1.56x its weights so, every file's bytes
    held to the end).

    ``load(..., widen_to=torch.float32)`` casts a file's narrower floating tensors (bfloat16, float16) itself,
    block by block into one anonymous mapping of its own, giving back each block of the file's bytes as it is
    cast: the file and its cast copy are never both held whole (a 545 MB float32 head from a 272 MB bfloat16
    file peaked at both), and the cast copies are pages ``release`` can give back in turn, so a stage that
    then copies them into another layout holds one copy too (it held the float32 original and its copy: a
    float32 stage from bfloat16 files, transposed, peaked at 1.63x its weights).

    With ``restorable``, what :meth:`release` gives back can be had again (:meth:`restore`): a layout whose
    copy cannot be read back (ONNX Runtime's packed weights, ``azu.engine.mlas``) gets its rows from the file
    when the stage moves off it. Each range's SHA-256 is taken as it is given back (1.4 GB/s on one core of
    a Zen 3), and the bytes read again must match it, or :meth:`restore` refuses them: the file was verified
    whole at load, and a file changed on disk since (in place, or swapped) cannot slip in, by accident or on
    purpose. They are read through the descriptor opened at load, not the path again.
    """

    # Elements cast at a time by ``load(widen_to=...)``: 16 MB of bfloat16 at once.
    WIDEN_BLOCK = 8 << 20

    def __init__(self, *, restorable: bool = False) -> None:
        self._buffers: list[_Loaded] = []
        self.restorable = restorable
        self._digests: dict[tuple[int, int], bytes] = {}  # (first, end) address -> SHA-256 of what went back
        self._files: dict[Path, int] = {}  # restorable: each file's descriptor, opened at load
        weakref.finalize(self, _close_all, self._files)

    def load(self, directory: str | os.PathLike[str], entry: FileEntry, *,
             widen_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``entry``'s tensors, views of its verified bytes; with ``widen_to``, its floating tensors of a
        narrower dtype come cast to ``widen_to`` (the same values: a widening cast is exact)."""
        buf, tensors = _load_verified(directory, entry)
        path = Path(directory) / entry.name
        if self.restorable and path not in self._files:
            # Read again through this descriptor (``restore``): a file swapped on disk since is not followed.
            self._files[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if isinstance(buf, mmap.mmap):
            self._track(buf, path=path)
        del buf  # the tensors hold the mapping from here: it goes with the last of them
        return self._widened(tensors, widen_to, path) if widen_to is not None else tensors

    def _track(self, buf: mmap.mmap, **source: Any) -> _Loaded:
        anchor = ctypes.c_char.from_buffer(buf)  # only to read the mapping's address
        loaded = _Loaded(ctypes.addressof(anchor), len(buf), weakref.ref(buf), **source)
        del anchor
        self._buffers.append(loaded)
        return loaded

    def _widened(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 path: Path) -> dict[str, torch.Tensor]:
        import torch

        size = torch.empty((), dtype=dtype).element_size()
        narrow = [k for k, t in tensors.items()
                  if t.is_floating_point() and t.element_size() < size and t.numel() and t.is_contiguous()]
        if not narrow:
            return tensors
        # Each cast tensor starts on a page of its own, so ``release`` can give all of its pages back.
        offsets, total = {}, 0
        for key in narrow:
            offsets[key] = total
            total += -(-tensors[key].numel() * size // mmap.PAGESIZE) * mmap.PAGESIZE
        wide = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE)  # private: see read_verified_bytes
        loaded = self._track(wide)
        file = self._holding(tensors[narrow[0]].data_ptr(), tensors[narrow[0]].data_ptr())
        out = dict(tensors)
        for key in narrow:
            source = out.pop(key)
            if file is not None:  # where the file's bytes of it are, to cast them again (``restore``)
                loaded.segments.append((offsets[key], source.numel() * size, path,
                                        source.data_ptr() - file.base, source.dtype))
            target = torch.frombuffer(wide, dtype=dtype, count=source.numel(), offset=offsets[key])
            flat = source.view(-1)
            for first in range(0, flat.numel(), self.WIDEN_BLOCK):
                block = flat[first:first + self.WIDEN_BLOCK]
                target[first:first + block.numel()].copy_(block)
                self._give_back(block)  # nothing else reads the file's copy: it is no longer in ``out``
            out[key] = target.view(source.shape)
            del source, flat, block
        del wide  # held by the cast tensors from here, weakly by this object
        return out

    def _holding(self, start: int, end: int) -> _Loaded | None:
        """The live mapping holding the bytes ``[start, end)``, if one does."""
        for loaded in self._buffers:
            if loaded.base <= start and end <= loaded.base + loaded.size and loaded.buffer() is not None:
                return loaded
        return None

    @staticmethod
    def _range(tensor: torch.Tensor) -> tuple[int, int]:
        start = tensor.data_ptr()
        return start, start + tensor.numel() * tensor.element_size()

    def release(self, tensor: torch.Tensor) -> int:
        """Give back the pages wholly inside the contiguous ``tensor``, if a loaded file's buffer (or a cast
        copy's) holds it; how many bytes went back. With ``restorable``, its bytes' SHA-256 is taken first
        (once: a range restored and given back again keeps it)."""
        start, end = self._range(tensor)
        if self.restorable and (start, end) not in self._digests and self.can_restore(tensor):
            self._digests[start, end] = hashlib.sha256(_bytes_of(tensor)).digest()
        return self._give_back(tensor)

    def _give_back(self, tensor: torch.Tensor) -> int:
        start, end = self._range(tensor)
        loaded = self._holding(start, end)
        buf = loaded.buffer() if loaded is not None else None
        if loaded is None or buf is None:
            return 0
        first = -(-(start - loaded.base) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (end - loaded.base) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            buf.madvise(mmap.MADV_DONTNEED, first, last - first)
            return last - first
        return 0

    def can_restore(self, tensor: torch.Tensor) -> bool:
        """Whether :meth:`restore` can give ``tensor``'s bytes back once :meth:`release` has given its pages
        away: it is contiguous, in a file's bytes or a cast copy of a file's tensor, and this object is
        ``restorable``."""
        if not self.restorable or not tensor.is_contiguous():
            return False
        start, end = self._range(tensor)
        loaded = self._holding(start, end)
        if loaded is None:
            return False
        return loaded.path is not None or any(
            first <= start - loaded.base and end - loaded.base <= first + size
            for first, size, *_ in loaded.segments)

    def restore(self, tensor: torch.Tensor) -> None:
        """Make ``tensor``'s bytes the loaded ones again (they were given back by :meth:`release`): read from
        its file (cast again, for a cast copy) into the same place, and checked against the SHA-256 taken as
        they went. ``IntegrityFailure`` if they differ (the file changed on disk) or cannot be read: the pages
        are given back again, and the caller must not read ``tensor``. Bytes never given back are left as
        they are."""
        import torch

        start, end = self._range(tensor)
        want = self._digests.get((start, end))
        if want is None:
            if not self.can_restore(tensor):
                raise ValueError("restore() of bytes LoadedFiles cannot read again")
            return  # never given back: still there
        loaded = self._holding(start, end)
        if loaded is None:
            raise ValueError("restore() of bytes whose mapping is gone")
        offset = start - loaded.base
        path = loaded.path
        try:
            if path is not None:
                _read_into(path, self._files[path], offset, _bytes_of(tensor))
            else:
                first, _size, path, source_first, dtype = next(
                    seg for seg in loaded.segments
                    if seg[0] <= offset and end - loaded.base <= seg[0] + seg[1])
                narrow = torch.empty((), dtype=dtype).element_size()
                elements = (offset - first) // tensor.element_size()
                raw = bytearray(tensor.numel() * narrow)
                _read_into(path, self._files[path], source_first + elements * narrow, memoryview(raw))
                with torch.inference_mode():
                    tensor.view(-1).copy_(torch.frombuffer(raw, dtype=dtype))
            if hashlib.sha256(_bytes_of(tensor)).digest() != want:
                raise IntegrityFailure(
                    f"{path.name}: bytes at {offset} changed on disk since the stage loaded them",
                    param=path.name)
        except BaseException:
            self._give_back(tensor)  # nothing half-read stays for a reader
            raise


def _close_all(files: dict[Path, int]) -> None:
    for fd in files.values():
        os.close(fd)
    files.clear()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of the contiguous CPU ``tensor``, writable, in place."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


def _read_into(path: Path, fd: int, offset: int, into: memoryview) -> None:
    """Read ``len(into)`` bytes of the file open as ``fd`` (``path``, for messages) from ``offset`` into
    ``into``."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if not n:
            raise IntegrityFailure(f"{path.name}: the file is shorter than when it was loaded",
                                   param=path.name)
        done += n


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _parse_safetensors(buf: bytearray | mmap.mmap, name: str) -> dict[str, torch.Tensor]:
    """Tensors as zero-copy views of a safetensors file's bytes (already hash-checked)."""
    import torch

    if len(buf) < 8:
        raise IntegrityFailure(f"{name}: not a safetensors file (too short)", param=name)
    header_len = int.from_bytes(buf[:8], "little")
    if header_len > len(buf) - 8:
        raise IntegrityFailure(f"{name}: safetensors header runs past the end of the file", param=name)
    try:
        header = json.loads(bytes(buf[8:8 + header_len]))
    except ValueError:
        raise IntegrityFailure(f"{name}: unreadable safetensors header", param=name) from None
    base = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = getattr(torch, _ST_DTYPES.get(info.get("dtype", ""), ""), None)
        start, stop = info["data_offsets"]
        if dtype is None or not 0 <= start <= stop <= len(buf) - base:
            raise IntegrityFailure(f"{name}: tensor {key} has an unsupported dtype or bad offsets",
                                   param=name)
        spans.append((start, stop, key))
        shape = info["shape"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (stop - start) // itemsize
        if count * itemsize != stop - start or count != math.prod(shape):
            raise IntegrityFailure(f"{name}: tensor {key} has {stop - start} bytes for shape {shape}",
                                   param=name)
        if stop - start == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif (base + start) % itemsize:  # unaligned: copy this one tensor out
            chunk = bytearray(buf[base + start:base + stop])
            out[key] = torch.frombuffer(chunk, dtype=dtype, count=count).reshape(shape)
        else:
            out[key] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).reshape(shape)
    # Two tensors on the same bytes: a stage gives a tensor's pages back once it has copied it (a cast,
    # another layout), and the other would then read zeros. The format forbids it; safetensors' reader
    # refuses it.
    spans.sort()
    for (_, stop, first), (start, _, second) in itertools.pairwise(spans):
        if start < stop:
            raise IntegrityFailure(f"{name}: tensors {first} and {second} share bytes", param=name)
    return out

