"""``azu shard``: split a Hugging Face causal LM into per-layer safetensors files plus ``manifest.json``.

Why it is built this way:
- Sharding only *moves bytes*: every output tensor is a byte range of a source file (a tied head is the
  embedding's byte range again, under the name ``lm_head.weight``). So the sharder never parses tensors
  into memory and never imports torch: it reads each source file's header, plans which output file each
  tensor goes to (``azu.engine.naming.classify_tensor``), and streams the byte ranges through a small
  fixed buffer into the output files, hashing each chunk from the buffer it writes (one output file
  per core at once: SHA-256 is the cost of sharding). Peak memory is a few MB above the
  interpreter's, whatever the size of the model or of its largest source file, and a layer whose
  tensors are spread over several source files of a sharded checkpoint needs no pending buffers.
- Output files are our own minimal safetensors writer: one ``__metadata__`` key (``{"format": "pt"}``),
  tensors ordered by (element size descending, name), so every tensor is aligned to its element size
  and the same source always gives the same bytes and hashes.
- Only ``.safetensors`` weights are accepted; pickle-based weights are refused before any weight byte
  is read, downloaded or written (they can run code when loaded). Which files those are is decided by
  ``azu.registry.sources`` (a local folder or a hub repo -> ``Source``); the sharder takes a ``Source``.
- Everything is checked before ``--out`` is touched; the folder is written under a temporary name next
  to it and renamed into place at the end, so a failure never leaves half a shard folder.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from azu.engine.naming import Part, classify_tensor
from azu.errors import AzuError, IntegrityFailure, InvalidRequest, NotFound, UnsafeFormat
from azu.registry.manifest import (
    EMBEDDINGS_FILE,
    HEAD_FILE,
    MANIFEST_NAME,
    ExtraFile,
    FileEntry,
    Manifest,
    layer_file_name,
)
from azu.registry.sources import INDEX_NAME, Source, open_source

# Input token embedding modules, by attribute name (the tensor a tied head is cloned from).
_TOKEN_EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
# config.json aliases across families (GPT-2 says n_layer, MPT n_layers, ...).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit: a larger header is an attack, not a model
_COPY_CHUNK = 8 * 1024 * 1024


# -- source files -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a source file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors file's header (the tensor bytes are not read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise IntegrityFailure(f"{path.name} is not a safetensors file (shorter than 8 bytes)",
                                   param=path.name)
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise IntegrityFailure(f"{path.name}: header length {n} is impossible for a {size}-byte file",
                                   param=path.name)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IntegrityFailure(f"{path.name}: safetensors header is not JSON ({exc})",
                                   param=path.name) from exc
    if not isinstance(header, dict):
        raise IntegrityFailure(f"{path.name}: safetensors header is not an object", param=path.name)
    data_start, data_len = 8 + n, size - 8 - n
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _DTYPE_SIZES[dtype]
            if not (all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(start, int) and isinstance(end, int)):
                raise ValueError("non-integer shape or offsets")
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityFailure(f"{path.name}: bad header entry for {name!r} ({exc!r})",
                                   param=path.name) from exc
        if not 0 <= start <= end <= data_len or end - start != math.prod(shape) * itemsize:
            raise IntegrityFailure(f"{path.name}: tensor {name!r} has offsets [{start}, {end}) that do not "
                                   f"fit its shape {shape} x {dtype} inside the file", param=path.name)
        out[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + start, end - start)
    # Overlapping ranges would let one tensor's bytes masquerade as another's.
    spans = sorted((t.offset, t.offset + t.nbytes) for t in out.values() if t.nbytes)
    for (_, prev_end), (start, _) in itertools.pairwise(spans):
        if start < prev_end:
            raise IntegrityFailure(f"{path.name}: tensors overlap in the file", param=path.name)
    return out


# -- planning -----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    parts: dict[Part, list[TensorInfo]]
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_head: bool
    torch_dtype: str | None
    architecture: str
    model_type: str

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for infos in self.parts.values() for t in infos)


def _config_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        if isinstance(config.get(k), int):
            return int(config[k])
    return None


def _token_embedding(candidates: list[TensorInfo], vocab_size: int | None, where: str) -> TensorInfo:
    found = [t for t in candidates
             if len(t.name.split(".")) >= 2 and t.name.split(".")[-2] in _TOKEN_EMBEDDING_MODULES
             and t.name.endswith(".weight") and len(t.shape) == 2
             and (vocab_size is None or t.shape[0] == vocab_size)]
    if len(found) != 1:
        raise InvalidRequest(f"{where}: the head is tied but the input embedding to clone is ambiguous "
                             f"({[t.name for t in found] or 'none found'})")
    return found[0]


def plan(source: Source) -> Plan:
    where = source.model_id
    tensors: dict[str, TensorInfo] = {}
    for name in sorted(source.weight_paths):
        for t in read_header(source.weight_paths[name]).values():
            if t.name in tensors:
                raise IntegrityFailure(f"{where}: tensor {t.name!r} is in both {tensors[t.name].path.name} "
                                       f"and {name}", param=name)
            tensors[t.name] = t
    if source.index is not None:
        for tname, fname in source.index["weight_map"].items():
            if tname not in tensors or tensors[tname].path.name != fname:
                raise IntegrityFailure(f"{where}: {INDEX_NAME} puts {tname!r} in {fname}, but that file "
                                       "does not hold it", param=fname)

    config = source.config
    parts: dict[Part, list[TensorInfo]] = {}
    for t in tensors.values():
        parts.setdefault(classify_tensor(t.name), []).append(t)
    layers = sorted(k for k in parts if isinstance(k, int))
    if not layers:
        raise InvalidRequest(f"{where}: no decoder layers found among the checkpoint's tensors")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise InvalidRequest(f"{where}: the checkpoint has no tensors for layers {missing}")
    declared = _config_int(config, _LAYER_KEYS)
    if declared is not None and declared != len(layers):
        raise InvalidRequest(f"{where}: config.json declares {declared} layers, "
                             f"the checkpoint holds {len(layers)}")
    if "embeddings" not in parts:
        raise InvalidRequest(f"{where}: the checkpoint has no embedding tensors")

    vocab_size = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    tie_flag = config.get("tie_word_embeddings")
    tied = bool(tie_flag)
    if "lm_head.weight" not in tensors:
        # A causal LM without lm_head on disk can only be tied; refuse when the config says otherwise.
        if tie_flag is False:
            raise InvalidRequest(f"{where}: no lm_head.weight in the checkpoint and config.json says the "
                                 "head is not tied to the embeddings")
        emb = _token_embedding(parts["embeddings"], vocab_size, where)
        parts.setdefault("head", []).append(replace(emb, name="lm_head.weight"))
        tied = True
    head_emb = next(t for t in parts["head"] if t.name == "lm_head.weight")
    hidden = _config_int(config, _HIDDEN_KEYS)
    # dtype of the weights as stored (the bulk of the bytes), not what config.json claims.
    by_dtype: dict[str, int] = {}
    for t in tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    main_dtype = max(sorted(by_dtype), key=lambda d: by_dtype[d])
    architectures = config.get("architectures") or []
    return Plan(
        parts=parts, num_layers=len(layers), hidden_size=hidden if hidden is not None else head_emb.shape[-1],
        vocab_size=vocab_size if vocab_size is not None else head_emb.shape[0], tied_head=tied,
        torch_dtype=_TORCH_DTYPE_NAMES.get(main_dtype, main_dtype.lower()),
        architecture=architectures[0] if architectures else "", model_type=str(config.get("model_type", "")),
    )


# -- writing ------------------------------------------------------------------------------------------------
class _Readers:
    """Source files opened on demand, one file descriptor each, shared by the writer threads (they map
    windows at explicit offsets: no shared file position). A window is unmapped as soon as it is written,
    so RSS stays at one window per thread whatever the file size."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _writer_threads() -> int:
    """How many output files are written at once: SHA-256 runs at ~1.3 GB/s on one core (SHA-NI) and is
    the cost of sharding, so one file per core; hashlib, reads and writes release the GIL."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4))


def write_safetensors(
    path: Path, tensors: list[TensorInfo], readers: _Readers, bar: Any = None
) -> tuple[str, int]:
    """Write ``tensors`` (byte ranges of source files) as one safetensors file; return (sha256, size).

    Each chunk is hashed from the very buffer that is written (hashed while copying: the file's bytes are
    never read back).
    """
    ordered = sorted(tensors, key=lambda t: (-_DTYPE_SIZES[t.dtype], t.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data (and with this order every tensor) is aligned
    digest = hashlib.sha256()
    with open(path, "wb", buffering=0) as out:
        for piece in (struct.pack("<Q", len(head)), head):
            digest.update(piece)
            out.write(piece)
        for t in ordered:
            fd = readers.fd(t.path)
            done = 0
            while done < t.nbytes:
                # A read-only window of the source's page cache: hashed and written from there, so each
                # byte is copied once (into the output file) instead of twice through a user buffer.
                # (Sources are the registry's verified downloads or an operator's folder: a file cut
                # short while mapped would be a bus error, not a wrong hash.)
                start = t.offset + done
                aligned = start - start % mmap.ALLOCATIONGRANULARITY
                n = min(t.nbytes - done, _COPY_CHUNK)
                try:
                    window = mmap.mmap(fd, start - aligned + n, access=mmap.ACCESS_READ, offset=aligned)
                except ValueError:  # the file is shorter than its header said
                    raise IntegrityFailure(f"{t.path.name} ended inside tensor {t.name!r}",
                                           param=t.path.name) from None
                with window, memoryview(window) as view:
                    chunk = view[start - aligned:]
                    digest.update(chunk)
                    written = 0
                    while written < n:
                        written += out.write(chunk[written:]) or 0
                    chunk.release()
                done += n
                if bar is not None:
                    bar.update(n)
        size = out.tell()
    return digest.hexdigest(), size


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(_COPY_CHUNK):
            digest.update(chunk)
            fo.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _part_file(part: Part) -> tuple[str, str, int | None]:
    if part == "embeddings":
        return EMBEDDINGS_FILE, "embeddings", None
    if part == "head":
        return HEAD_FILE, "head", None
    return layer_file_name(part), "layer", part


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise InvalidRequest(f"{out} exists and is not an azu shard folder; refusing to overwrite it")


def _write_parts(source: Source, staging: Path, readers: _Readers, bar: Any) -> tuple[Plan, list[FileEntry]]:
    """Plan, and write every output file, several at once; return the plan and the files' entries.

    A hub source whose weight files are still arriving (with an index, so which files hold a part is known
    up front) gets each embeddings/layer file written as soon as the source files holding its tensors are
    in; the plan, with every check, runs once all have arrived, and any part whose tensors differ from
    what was written early is written again. The rest goes largest first (the embeddings and a tied
    head's clone would otherwise be hashed alone at the end).
    """
    with ThreadPoolExecutor(max_workers=_writer_threads(), thread_name_prefix="azu-shard") as pool:
        futures: dict[Part, Future[tuple[str, int]]] = {}
        written: dict[Part, list[TensorInfo]] = {}

        def write(part: Part, tensors: list[TensorInfo]) -> None:
            if part in futures:
                futures[part].result()  # never two writers on one file
            written[part] = tensors
            futures[part] = pool.submit(write_safetensors, staging / _part_file(part)[0], tensors, readers,
                                        bar)

        try:
            if source.arriving and source.index is not None:
                _write_while_arriving(source, write)
            source.wait_all()
            p = plan(source)
            bar.total = p.total_bytes
            bar.refresh()
            order: list[Part] = ["embeddings", *range(p.num_layers), "head"]
            for part in sorted(order, key=lambda part: -sum(t.nbytes for t in p.parts[part])):
                if sorted(written.get(part, []), key=lambda t: t.name) != sorted(p.parts[part],
                                                                                 key=lambda t: t.name):
                    write(part, p.parts[part])
            results = {part: futures[part].result() for part in order}
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise
    files = []
    for part in order:
        name, kind, layer = _part_file(part)
        sha, size = results[part]
        files.append(FileEntry(name=name, kind=kind, layer=layer, sha256=sha, size=size,  # type: ignore[arg-type]
                               tensors=tuple(sorted(t.name for t in p.parts[part]))))
    return p, files


def _write_while_arriving(source: Source, write: Callable[[Part, list[TensorInfo]], None]) -> None:
    """Write each embeddings/layer part once every file the index puts its tensors in has arrived."""
    assert source.index is not None
    needs: dict[Part, set[str]] = {}
    for tensor_name, file_name in source.index["weight_map"].items():
        needs.setdefault(classify_tensor(tensor_name), set()).add(file_name)
    needs.pop("head", None)  # a tied head is the embedding's clone: decided by the plan, at the end
    headers: dict[str, list[TensorInfo]] = {}
    for name in source.arriving:  # in download order
        headers[name] = list(read_header(source.wait_for(name)).values())
        for part, names in list(needs.items()):
            if names <= headers.keys():
                del needs[part]
                write(part, [t for n in sorted(names) for t in headers[n] if classify_tensor(t.name) == part])


def write_shards(source: Source, out_dir: str | os.PathLike[str], *, progress: bool = True) -> Manifest:
    """Plan, then write the shard folder under a temporary name and move it into place.

    A local source is planned (every check) before anything is written; a hub source still downloading is
    written as its files arrive and planned once all are in. Either way ``out_dir`` is touched only at the
    end, when everything has been checked.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if not source.arriving:
        plan(source)  # fail before writing anything
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    readers = _Readers()
    try:
        with tqdm(total=None, unit="B", unit_scale=True, desc=f"sharding {source.model_id}",
                  disable=not progress, file=sys.stderr) as bar:
            p, files = _write_parts(source, staging, readers, bar)
        extras = []
        for name in sorted(source.extra_paths):
            sha, size = _copy_hashed(source.extra_paths[name], staging / name)
            extras.append(ExtraFile(name=name, sha256=sha, size=size))
        manifest = Manifest(
            model_id=source.model_id, source_revision=source.revision, architecture=p.architecture,
            model_type=p.model_type, num_layers=p.num_layers, hidden_size=p.hidden_size,
            vocab_size=p.vocab_size, tied_head=p.tied_head, torch_dtype=p.torch_dtype, config=source.config,
            files=files, extra_files=extras,
        )
        manifest.save(staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        readers.close()
    manifest.directory = out
    return manifest


def _move_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        # Checked above: empty, or an earlier shard folder. Swap it out, then delete it.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- entry points -------------------------------------------------------------------------------------------
def shard_model(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, token: str | None = None,
    revision: str | None = None, progress: bool = True, cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Manifest:
    """Shard ``source`` (a local model folder or a hub id, see ``azu.registry.sources.open_source``) into
    ``out_dir``; return the manifest."""
    src = open_source(source, token=token, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                      progress=progress, background=True)
    try:
        return write_shards(src, out_dir, progress=progress)
    finally:
        src.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="local Hugging Face model folder, or a hub id (Qwen/Qwen2.5-0.5B)")
    parser.add_argument("--out", required=True, help="shard folder to write")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for hub downloads "
                        "(default: huggingface_hub's, ~/.cache/huggingface or HF_HOME)")
    parser.add_argument("--json", action="store_true", help="print the manifest summary as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = shard_model(args.source, args.out, revision=args.revision, cache_dir=args.cache_dir,
                               progress=not args.quiet)
    except AzuError as exc:
        print(f"azu shard: error: {exc.message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": exc.message}}, sort_keys=True))
        return 2 if isinstance(exc, (UnsafeFormat, InvalidRequest, NotFound)) else 1
    if args.json:
        print(json.dumps(manifest.summary(), sort_keys=True))
    else:
        print(f"{manifest.model_id}: {manifest.num_layers} layers, {len(manifest.files)} files, "
              f"{manifest.total_weight_bytes / 1e6:.1f} MB -> {args.out}")
    return 0
