"""What a worker does with a load order: fetch a span's files from the registry, then open it as a stage.

Every file comes through azu.registry.download (size and SHA-256 from the manifest checked before a file is
kept; pickle formats refused by name), and the manifest itself is checked against the hash the scheduler put
in the load order, so a registry that serves other bytes than it sharded is caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from azu.engine.span import Span
from azu.network.placement import MEMORY_HEADROOM
from azu.registry.download import check_file_name, download, fetch_bytes
from azu.registry.manifest import ExtraFile, FileEntry, Manifest
from azu.registry.status import registry_file_url

if TYPE_CHECKING:
    from azu.engine.stage import Stage


def model_folder(cache_dir: Path, model_id: str) -> Path:
    """Where a worker keeps ``model_id``'s files (its tokenizer files too)."""
    return cache_dir / model_id.replace("/", "--")


def fetch_span(registry_url: str, model_id: str, span: Span, folder: Path, *,
               manifest_sha256: str | None = None) -> Path:
    """Download the files ``span`` of ``model_id`` needs (and the extra files) into ``folder``; return it.

    Files already there with the right hash are kept; the manifest is written last, once all is in place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    raw = fetch_bytes(registry_file_url(registry_url, model_id, "manifest.json"), sha256=manifest_sha256)
    manifest = Manifest.from_dict(json.loads(raw))
    weights = manifest.files_for(span.first, span.last, embeddings=span.embeddings, head=span.head)
    entries: list[FileEntry | ExtraFile] = [*weights, *manifest.extra_files]
    for entry in entries:
        name = check_file_name(entry.name, weights=entry in manifest.files)
        download(registry_file_url(registry_url, model_id, name), folder / name, sha256=entry.sha256,
                 size=entry.size)
    # A temporary name of this writer's own: two loads into one folder at once (two spans of a model on one
    # machine's shared cache) must not replace each other's half-written file, nor find theirs gone. A
    # fixed name made the second writer's os.replace fail (FileNotFoundError) when the first had already
    # moved it: a load failed for no reason, more often the busier the machine (issue "Survive faults").
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(tmp, folder / "manifest.json")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return folder


def open_stage(folder: Path, span: Span, *, device: str, dtype: str,
               max_cached_tokens: int, kernels: str = "auto", graphs: str = "auto") -> tuple[Stage, int]:
    """The stage holding ``span`` from a shard folder, and the memory it counts for (weights + headroom)."""
    from azu.engine.stage import Stage

    stage = Stage.load(folder, span, device=device, dtype=dtype, max_cached_tokens=max_cached_tokens,
                       kernels=kernels, graphs=graphs)
    files = Manifest.load(folder).files_for(span.first, span.last, embeddings=span.embeddings, head=span.head)
    return stage, int(sum(e.size for e in files) * MEMORY_HEADROOM)
