"""Download and verify: the one way azu fetches a file it will trust.

A file is streamed to ``.<name>.part`` beside its destination while it is hashed; it replaces the
destination (atomically) only when its size and SHA-256 are the ones promised. Anything else (a short or long
body, a wrong hash, an HTTP error, a full disk) removes the partial file and raises: nothing half-written is
ever left behind or read. Workers fetch their layers this way, the API fetches tokenizer files this way.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from azu.errors import AzuError, IntegrityFailure, InvalidRequest, UnsafeFormat

CHUNK = 1 << 20  # read and hash in 1 MiB pieces: memory stays flat whatever the file size
# Formats that can run code when loaded: never downloaded, whatever a manifest or a hub listing says.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")


class DownloadFailed(AzuError):
    """The server did not hand the file over (HTTP error, connection lost)."""

    status = 502
    code = "download_failed"


def check_file_name(name: str, *, weights: bool = False, listed_in: str | None = None) -> str:
    """A plain file name (no folders, not hidden); weights must be safetensors. Refused before any request.

    ``listed_in``: the untrusted file that named it (a manifest, an index), for the error message.
    """
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        if listed_in is not None:
            raise InvalidRequest(f"{listed_in} names an unsafe file path {name!r}")
        raise InvalidRequest(f"unsafe file name {name!r}")
    if name.lower().endswith(PICKLE_SUFFIXES) or (weights and not name.endswith(".safetensors")):
        raise UnsafeFormat(f"{name}: only .safetensors weights are accepted")
    return name


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_cached(path: Path, *, sha256: str, size: int | None = None) -> bool:
    """True if ``path`` already holds exactly the promised bytes (an earlier download)."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return sha256_file(path) == sha256


def fetch_bytes(url: str, *, sha256: str | None = None, max_bytes: int = 64 << 20,
                timeout: float = 60.0) -> bytes:
    """A small file (a manifest, a tokenizer file) in memory, checked against ``sha256`` when given."""
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout) as resp:
            if resp.status_code != 200:
                raise DownloadFailed(f"{url} answered HTTP {resp.status_code}")
            chunks: list[bytes] = []
            got = 0
            for chunk in resp.iter_content(CHUNK):
                got += len(chunk)
                if got > max_bytes:
                    raise IntegrityFailure(f"{url} is larger than {max_bytes} bytes")
                chunks.append(chunk)
    except requests.RequestException as exc:
        raise DownloadFailed(f"could not download {url}: {type(exc).__name__}") from exc
    data = b"".join(chunks)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityFailure(f"{url}: the bytes do not match the promised SHA-256")
    return data


def download(url: str, dest: Path, *, sha256: str, size: int | None = None, timeout: float = 60.0) -> Path:
    """Stream ``url`` into ``dest``, replacing it only if exactly ``size`` bytes hashing to ``sha256`` came.

    A destination that already holds those bytes is kept without a request.
    """
    import requests

    if is_cached(dest, sha256=sha256, size=size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two processes downloading one file into a shared folder must not race.
    fd, part_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    part = Path(part_name)
    h = hashlib.sha256()
    got = 0
    try:
        try:
            with requests.get(url, stream=True, timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise DownloadFailed(f"{url} answered HTTP {resp.status_code}")
                with open(fd, "wb", closefd=True) as f:
                    fd = -1
                    for chunk in resp.iter_content(CHUNK):
                        got += len(chunk)
                        if size is not None and got > size:
                            break  # longer than promised: no point reading the rest
                        h.update(chunk)
                        f.write(chunk)
        except requests.RequestException as exc:
            raise DownloadFailed(f"could not download {url}: {type(exc).__name__}") from exc
        if (size is not None and got != size) or h.hexdigest() != sha256:
            raise IntegrityFailure(f"{dest.name}: the downloaded bytes do not match the manifest (size or "
                                   "SHA-256)", param=dest.name)
        os.replace(part, dest)
    finally:
        if fd != -1:
            os.close(fd)
        part.unlink(missing_ok=True)  # gone on every failure (a full disk must not stay full)
    return dest
