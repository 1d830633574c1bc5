"""Fetch a model from the Hugging Face hub for the sharder, safely.

Order matters: list the repo (with per-file metadata) first, decide from the names alone which files
to fetch, refuse a pickle-only repo before downloading anything, then download only safetensors weights,
their index, config and tokenizer files — never a pickle — and check each against the hash the hub
publishes (LFS files: SHA-256; small git files: the git blob id). A mismatch deletes the download.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

from azu.errors import AzuError, Forbidden, IntegrityFailure, NotFound
from azu.registry.manifest import sha256_file
from azu.registry.sharder import (
    EXTRA_FILE_NAMES,
    INDEX_NAME,
    Source,
    parse_index,
    select_weight_files,
)


class HubUnavailable(AzuError):
    """The hub (or HF_ENDPOINT) could not be reached or answered with an error."""

    status = 502
    code = "hub_unavailable"


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _network_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """``extra`` + the transport errors of whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [*extra, OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the hub publishes for non-LFS files)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, sibling: Any, *, repo_id: str, weight: bool) -> None:
    """Check a downloaded file against the hub's published hash; delete it on mismatch."""
    name = sibling.rfilename
    if sibling.lfs is not None:
        expected, actual, algo = sibling.lfs.sha256, sha256_file(path), "SHA-256"
    elif sibling.blob_id:
        expected, actual, algo = sibling.blob_id, git_blob_sha1(path), "git blob id"
    elif weight:
        raise IntegrityFailure(f"{repo_id}: the hub publishes no SHA-256 for {name}; refusing it", param=name)
    else:
        return
    if actual != expected.lower():
        _delete_download(path)
        raise IntegrityFailure(f"{repo_id}/{name}: {algo} {actual} does not match the hub's {expected}; "
                               "the download was deleted", param=name)


def _delete_download(path: Path) -> None:
    # In the HF cache the snapshot entry is a symlink to a blob: remove both.
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def fetch(repo_id: str, *, revision: str | None = None, token: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
          progress: bool = True) -> Source:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    tqdm_class = None if progress else _silent_tqdm()
    try:
        api = HfApi(endpoint=endpoint, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        commit = info.sha or revision
        names = list(siblings)
        # Decide from the listing alone first: a pickle-only repo is refused before any download.
        select_weight_files([n for n in names if n != INDEX_NAME], None, where=repo_id)

        def download(name: str, *, weight: bool) -> Path:
            path = Path(hf_hub_download(repo_id, name, revision=commit, token=token,
                                        cache_dir=None if cache_dir is None else Path(cache_dir),
                                        endpoint=endpoint, tqdm_class=tqdm_class))
            _verify(path, siblings[name], repo_id=repo_id, weight=weight)
            return path

        index = None
        if INDEX_NAME in siblings:
            index = parse_index(download(INDEX_NAME, weight=False).read_bytes(), where=repo_id)
        weights = select_weight_files(names, index, where=repo_id)
        extras = {n: download(n, weight=False) for n in EXTRA_FILE_NAMES if n in siblings}
        weight_paths = {n: download(n, weight=True) for n in weights}
    except GatedRepoError as exc:
        raise Forbidden(f"{repo_id} is gated: set HF_TOKEN to a token with access ({exc})") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise NotFound(f"{repo_id}{'@' + revision if revision else ''}: {exc}") from exc
    except _network_errors(HfHubHTTPError) as exc:
        raise HubUnavailable(f"could not fetch {repo_id} from {endpoint or 'the hub'}: {exc}") from exc
    return Source(model_id=repo_id, revision=info.sha, weight_paths=weight_paths, extra_paths=extras,
                  index=index)
