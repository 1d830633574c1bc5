"""Model sources: what a checkpoint is made of and how its files get onto local disk, safely.

A source is a local folder (accepted from a request only under ``AZU_ALLOWED_MODEL_DIRS``) or a Hugging
Face hub id. Either way the result is a ``Source``: the ``.safetensors`` weight files, their index, and the
config/tokenizer files, all on local disk. The sharder (``azu.registry.sharder``) takes a ``Source`` and
only moves bytes; it never decides which files to trust, so it depends on this module and not the reverse.

Hub order matters: list the repo (with per-file metadata) first, decide from the names alone which files
to fetch, refuse a pickle-only repo before downloading anything, then download only safetensors weights,
their index, config and tokenizer files — never a pickle — and check each against the hash the hub
publishes (LFS files: SHA-256; small git files: the git blob id). A mismatch deletes the download.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azu.config import get_settings
from azu.errors import (
    Forbidden,
    IntegrityFailure,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnsafeFormat,
)
from azu.registry.download import PICKLE_SUFFIXES, check_file_name, sha256_file

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Non-weight files copied into the shard folder when the source has them (all plain text / JSON /
# sentencepiece protobuf: nothing that executes when read).
EXTRA_FILE_NAMES = (
    CONFIG_NAME, "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
# A hub id ("org/name") or a bare name: what a served model id may look like (a local folder is served
# under its folder name). ".." is refused separately: the id becomes a folder name under the registry.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class HubUnavailable(ServiceUnavailable):
    """The hub (or HF_ENDPOINT) could not be reached or answered with an error: a 503, retry later."""

    code = "hub_unavailable"


# -- model ids ------------------------------------------------------------------------------------------
def is_hub_id(text: str) -> bool:
    return isinstance(text, str) and HUB_ID.fullmatch(text) is not None and ".." not in text


def validate_model_id(model_id: str) -> str:
    if not is_hub_id(model_id):
        raise InvalidRequest(f"invalid model id {model_id!r}: expected a Hugging Face id like "
                             "'org/name' or a folder name", param="model_id")
    return model_id


# -- local folders --------------------------------------------------------------------------------------
def allowed_model_dirs() -> list[Path]:
    return list(get_settings().allowed_model_dirs)


def is_local_source(source: str) -> bool:
    # Hub ids never start like a path, so there is no guessing between the two.
    return source.startswith(("/", "./", "../", "~"))


def check_local_source(source: str) -> Path:
    """The resolved folder, if it lies under a directory the operator allows; Forbidden otherwise."""
    path = Path(source).expanduser().resolve()
    allowed = allowed_model_dirs()
    if not any(path == d or d in path.parents for d in allowed):
        raise Forbidden("local model folders are accepted only under AZU_ALLOWED_MODEL_DIRS "
                        f"({'not set' if not allowed else 'this folder is not under it'})", param="model_id")
    if not path.is_dir():
        raise NotFound(f"no model folder at {source}", param="model_id")
    return path


def resolve_request(model_id: str, source: str | None = None) -> tuple[str, str]:
    """(served model id, source) of a shard request. A local folder is served under its folder name."""
    if source is None and is_local_source(model_id):
        source = str(check_local_source(model_id))
        model_id = Path(source).name
    elif source is not None and is_local_source(source):
        source = str(check_local_source(source))
    return validate_model_id(model_id), source or model_id


# -- what a checkpoint is made of -----------------------------------------------------------------------
@dataclass
class Source:
    """A checkpoint on local disk, ready to shard: which files, and what they are.

    A hub source may still be downloading its weight files: ``arriving`` holds them by name, each a
    future of its verified local path, in download order. ``weight_paths`` holds the ones already in;
    ``wait_for`` blocks for one; ``close`` stops the downloads that have not started.
    """

    model_id: str
    revision: str | None
    weight_paths: dict[str, Path]
    extra_paths: dict[str, Path]
    index: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    arriving: dict[str, Future[Path]] = field(default_factory=dict)
    _downloads: ThreadPoolExecutor | None = field(default=None, repr=False)

    def wait_for(self, name: str) -> Path:
        """The local path of weight file ``name``, once downloaded and verified (its error otherwise)."""
        if name not in self.weight_paths:
            self.weight_paths[name] = self.arriving[name].result()
        return self.weight_paths[name]

    def wait_all(self) -> None:
        for name in self.arriving:
            self.wait_for(name)

    def close(self) -> None:
        """Cancel the downloads not started yet and wait for the one running (nothing runs after this)."""
        if self._downloads is not None:
            self._downloads.shutdown(wait=True, cancel_futures=True)
            self._downloads = None


def select_weight_files(names: Iterable[str], index: dict[str, Any] | None, *, where: str) -> list[str]:
    """The ``.safetensors`` files that make up the checkpoint, or UnsafeFormat if there are only pickles.

    ``names``: every file of the source (repo-relative, ``/``-separated). An index decides when present
    (a repo may also hold e.g. Mistral's ``consolidated.safetensors``, a duplicate of the same weights).
    """
    names = list(names)
    top = {n for n in names if "/" not in n}
    if index is not None:
        # Names come from an untrusted index: never let one escape the source folder.
        files = sorted({check_file_name(f, listed_in=INDEX_NAME) for f in index["weight_map"].values()})
        bad = [f for f in files if not f.endswith(".safetensors")]
        if bad:
            raise UnsafeFormat(f"{where}: {INDEX_NAME} points at non-safetensors files {bad}")
        missing = [f for f in files if f not in top]
        if missing:
            raise NotFound(f"{where}: {INDEX_NAME} lists files that are not there: {missing}")
        return files
    if "model.safetensors" in top:
        return ["model.safetensors"]
    files = sorted(n for n in top if n.endswith(".safetensors"))
    if files:
        return files
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeFormat(
            f"{where} has only pickle-based weights ({', '.join(pickles)}); azu accepts .safetensors only, "
            "because loading a pickle can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise NotFound(f"{where} has no .safetensors weights")


def parse_index(raw: bytes, *, where: str) -> dict[str, Any]:
    try:
        index = json.loads(raw)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map is not a name -> file object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InvalidRequest(f"{where}: {INDEX_NAME} is malformed ({exc})") from exc
    return index


def load_config(source: Source) -> Source:
    """Read the source's config.json into ``source.config`` (the sharder plans from it)."""
    path = source.extra_paths.get(CONFIG_NAME)
    if path is None:
        raise NotFound(f"{source.model_id} has no config.json")
    try:
        config = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{source.model_id}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{source.model_id}: config.json is not an object")
    source.config = config
    return source


def local_source(directory: str | os.PathLike[str]) -> Source:
    root = Path(directory)
    if not root.is_dir():
        raise NotFound(f"{root} is not a folder")
    names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    index = parse_index((root / INDEX_NAME).read_bytes(), where=str(root)) if INDEX_NAME in names else None
    weights = select_weight_files(names, index, where=str(root))
    extras = [n for n in EXTRA_FILE_NAMES if n in names]
    return Source(model_id=root.resolve().name, revision=None,
                  weight_paths={n: root / n for n in weights}, extra_paths={n: root / n for n in extras},
                  index=index)


def open_source(source: str | os.PathLike[str], *, token: str | None = None, revision: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
                progress: bool = True, background: bool = False) -> Source:
    """``source`` (an existing local folder, else a hub id) as a ``Source`` with its config read.

    Hub downloads use ``HF_TOKEN`` (when ``token`` is None) and ``HF_ENDPOINT`` (when ``endpoint`` is
    None), go to the Hugging Face cache (or ``cache_dir``) and are each checked against the hash the hub
    publishes; with ``background`` the weight files arrive while the caller works (see ``fetch``).
    """
    path = Path(source)
    if path.exists():
        src = local_source(path)
        if revision is not None:
            raise InvalidRequest("--revision applies to hub ids, not to a local folder")
    elif isinstance(source, str) and is_hub_id(source):
        src = fetch(source, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                    progress=progress, background=background)
    else:
        raise NotFound(f"{source} is neither a folder nor a Hugging Face model id")
    try:
        return load_config(src)
    except BaseException:
        src.close()
        raise


# -- the hub --------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str | None) -> Iterator[None]:
    """huggingface_hub's errors as azu's (gated: 403, missing: 404, transport: 503)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise Forbidden(f"{repo_id} is gated: set HF_TOKEN to a token with access ({exc})") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise NotFound(f"{repo_id}{'@' + revision if revision else ''}: {exc}") from exc
    except _network_errors(HfHubHTTPError) as exc:
        raise HubUnavailable(f"could not fetch {repo_id} from {endpoint or 'the hub'}: {exc}") from exc


def fetch(repo_id: str, *, revision: str | None = None, token: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
          progress: bool = True, background: bool = False) -> Source:
    """Download the checkpoint files of hub repo ``repo_id`` (never a pickle) and verify each one.

    ``background``: return once the listing, the index and the small files are in; the weight files are
    then downloaded one after another in a thread (``Source.arriving``), so a caller can work on each as it
    arrives. The caller must ``close()`` the source.
    """
    from huggingface_hub import HfApi, hf_hub_download

    settings = get_settings()
    # Passed explicitly: huggingface_hub reads HF_ENDPOINT once, at import, and would miss a later change.
    endpoint = endpoint or settings.hf_endpoint
    token = token or settings.hf_token
    tqdm_class = None if progress else _silent_tqdm()
    with _hub_errors(repo_id, revision, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        commit = info.sha or revision
        names = list(siblings)
        # Decide from the listing alone first: a pickle-only repo is refused before any download.
        select_weight_files([n for n in names if n != INDEX_NAME], None, where=repo_id)

        def download(name: str, *, weight: bool) -> Path:
            with _hub_errors(repo_id, revision, endpoint):
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
        source = Source(model_id=repo_id, revision=info.sha, weight_paths={}, extra_paths=extras, index=index)
        if not background:
            source.weight_paths = {n: download(n, weight=True) for n in weights}
            return source
    # One download at a time, in the files' order (a checkpoint's first file holds its first layers).
    source._downloads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="azu-hub-download")
    source.arriving = {n: source._downloads.submit(download, n, weight=True) for n in weights}
    return source


# -- how large a checkpoint is, before anything is downloaded -------------------------------------------
def hub_weight_bytes(repo_id: str, *, revision: str | None = None, token: str | None = None,
                     endpoint: str | None = None) -> int:
    """The bytes of the ``.safetensors`` weights of hub repo ``repo_id``, from its listing alone.

    Every top-level ``.safetensors`` file counts (a repo holding the same weights twice counts twice: the
    sum is an upper bound). UnsafeFormat for a pickle-only repo; a weight without a published size is
    refused, since its size cannot be checked.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    settings = get_settings()
    endpoint = endpoint or settings.hf_endpoint
    try:
        info = HfApi(endpoint=endpoint, token=token or settings.hf_token).model_info(
            repo_id, revision=revision, files_metadata=True)
    except GatedRepoError as exc:
        raise Forbidden(f"{repo_id} is gated: set HF_TOKEN to a token with access ({exc})") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFound(f"{repo_id}: no such model on {endpoint or 'the hub'}", param="model_id") from exc
    except _network_errors(HfHubHTTPError) as exc:
        raise HubUnavailable(f"could not list {repo_id} on {endpoint or 'the hub'}: {exc}") from exc
    siblings = {sib.rfilename: sib for sib in info.siblings or []}
    weights = select_weight_files([n for n in siblings if n != INDEX_NAME], None, where=repo_id)
    total = 0
    for name in weights:
        sib = siblings[name]
        size = sib.lfs.size if sib.lfs is not None else sib.size
        if not isinstance(size, int) or size < 0:
            raise IntegrityFailure(f"{repo_id}: the hub publishes no size for {name}; refusing it",
                                   param=name)
        total += size
    return total


def local_weight_bytes(folder: str | os.PathLike[str]) -> int:
    root = Path(folder)
    names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    return sum((root / n).stat().st_size for n in select_weight_files(names, None, where=str(root)))


def check_size(source: str, *, max_bytes: int) -> int:
    """The checkpoint's weight bytes, if at most ``max_bytes`` (AZU_MAX_SHARD_BYTES); Forbidden otherwise."""
    size = local_weight_bytes(source) if is_local_source(source) else hub_weight_bytes(source)
    if size > max_bytes:
        raise Forbidden(f"{source} has {size} bytes of weights; this registry shards at most {max_bytes} "
                        "(AZU_MAX_SHARD_BYTES)", param="model_id")
    return size
