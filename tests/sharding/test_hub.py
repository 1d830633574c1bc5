"""azu shard from a hub id, against a real HTTP stand-in for the hub on loopback (HF_ENDPOINT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from azu.cli.demo import build_model
from azu.errors import IntegrityFailure, NotFound, UnsafeFormat
from azu.registry import sharder
from azu.registry.manifest import Manifest
from azu.registry.sharder import shard_model
from azu.registry.sources import HubUnavailable
from tests.support import REPO
from tests.support.fake_hub import FakeHub


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("hubsrc") / "tiny", max_shard_size="100KB")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file or cache of the user's
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.stop()


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_hub_id_shards_like_the_local_folder_and_never_fetches_pickles(hub, tiny, tmp_path):
    pickles = {"pytorch_model.bin": b"\x80\x04 pickle", "original/consolidated.pth": b"\x80\x04 pickle"}
    repo = hub.add_folder("acme/tiny-llama", tiny, extra=pickles)
    cache = tmp_path / "cache"

    m = shard_model("acme/tiny-llama", tmp_path / "out", cache_dir=cache, progress=False)
    local = shard_model(tiny, tmp_path / "local", progress=False)

    assert m.model_id == "acme/tiny-llama" and m.source_revision == repo.commit
    # Same bytes in, same shards out: the hub path only changes where the source comes from.
    assert [e.to_dict() for e in m.files] == [e.to_dict() for e in local.files]
    assert m.extra_files == local.extra_files
    fetched = hub.resolved()
    assert set(_weight_files(tiny)) <= set(fetched)
    assert not [f for f in fetched if f.endswith((".bin", ".pth"))]
    assert "pytorch_model.bin" not in str(os.listdir(cache))
    api_calls = [r.path for r in hub.requests if r.path.startswith("/api/")]
    assert api_calls == ["/api/models/acme/tiny-llama"]


def test_hf_token_is_sent(hub, tiny, tmp_path, monkeypatch):
    hub.add_folder("acme/private", tiny)
    monkeypatch.setenv("HF_TOKEN", "hf_localtesttoken")
    shard_model("acme/private", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    auth = {r.headers.get("authorization") for r in hub.requests}
    assert auth == {"Bearer hf_localtesttoken"}


def test_tampered_download_is_deleted_and_refused(hub, tiny, tmp_path):
    victim = _weight_files(tiny)[1]
    real = (tiny / victim).read_bytes()
    tampered = bytearray(real)
    tampered[-3] ^= 0x55  # same size, still a valid safetensors file: only the hash can tell
    hub.add_folder("acme/tampered", tiny, tamper={victim: bytes(tampered)})
    cache = tmp_path / "cache"

    with pytest.raises(IntegrityFailure, match=victim.replace(".", r"\.")) as err:
        shard_model("acme/tampered", tmp_path / "out", cache_dir=cache, progress=False)
    assert "deleted" in str(err.value)
    assert victim in hub.resolved()
    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == bytes(tampered)]
    assert leftovers == []
    assert not [p for p in cache.rglob(victim)]  # the snapshot entry is gone too
    assert not (tmp_path / "out").exists()


def test_cache_tampered_after_download_is_caught(hub, tiny, tmp_path):
    hub.add_folder("acme/cached", tiny)
    cache = tmp_path / "cache"
    shard_model("acme/cached", tmp_path / "out", cache_dir=cache, progress=False)
    victim = _weight_files(tiny)[0]
    (entry,) = cache.rglob(victim)
    blob = entry.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(IntegrityFailure, match="does not match the hub"):
        shard_model("acme/cached", tmp_path / "out2", cache_dir=cache, progress=False)
    assert not blob.exists()
    # The next run downloads it again and succeeds.
    m = shard_model("acme/cached", tmp_path / "out3", cache_dir=cache, progress=False)
    assert m.num_layers == 4


def test_pickle_only_repo_is_refused_before_any_download(hub, tmp_path):
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
    hub.add_folder("acme/pickled", tmp_path / "empty-does-not-exist", extra={
        "config.json": config, "pytorch_model.bin": b"\x80\x04 pickle", "tokenizer.json": b"{}",
    })
    with pytest.raises(UnsafeFormat, match=r"pytorch_model\.bin"):
        shard_model("acme/pickled", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert hub.resolved() == []  # listed, then refused: not one file fetched
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_revision_and_unknown_repo(hub, tiny, tmp_path):
    repo = hub.add_folder("acme/rev", tiny)
    m = shard_model("acme/rev", tmp_path / "out", revision=repo.commit, cache_dir=tmp_path / "c",
                    progress=False)
    assert m.source_revision == repo.commit
    with pytest.raises(NotFound):
        shard_model("acme/rev", tmp_path / "o2", revision="nope", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(NotFound):
        shard_model("acme/missing", tmp_path / "o3", cache_dir=tmp_path / "c", progress=False)


def _azu(hub: FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "azu.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)


@pytest.mark.slow  # starts a fresh Python process that runs the azu command
def test_cli_from_hub(hub, tiny, tmp_path):
    victim = _weight_files(tiny)[0]
    tampered = bytearray((tiny / victim).read_bytes())
    tampered[-1] ^= 1
    hub.add_folder("acme/good", tiny)
    hub.add_folder("acme/bad", tiny, tamper={victim: bytes(tampered)})

    ok = _azu(hub, tmp_path, "shard", "acme/good", "--out", str(tmp_path / "good"), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model_id"] == "acme/good"
    assert Manifest.load(tmp_path / "good").source_revision == hub.repos["acme/good"].commit

    bad = _azu(hub, tmp_path, "shard", "acme/bad", "--out", str(tmp_path / "bad"), "--json", "--quiet")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "integrity_failure"
    assert victim in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    gone = FakeHub()  # bound then closed without serving: nothing listens on its port any more
    gone._server.server_close()
    monkeypatch.setenv("HF_ENDPOINT", gone.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(HubUnavailable, match="could not fetch acme/x"):
        shard_model("acme/x", tmp_path / "out", cache_dir=tmp_path / "c", progress=False)


class _HoldingHub(FakeHub):
    """Holds the download of one file until ``release`` is set (or 30 s pass), and says which it was."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held, self.release = held, threading.Event()
        self.released_by_event: bool | None = None

    def _handle(self, h, *, head: bool) -> None:
        if not head and h.path.endswith(f"/{self.held}"):
            self.released_by_event = self.release.wait(timeout=30)
        super()._handle(h, head=head)


def test_hub_files_are_sharded_as_they_arrive(tiny, tmp_path, monkeypatch):
    weights = _weight_files(tiny)
    last = weights[-1]
    hub = _HoldingHub(held=last).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    written_before_last: list[str] = []
    real_write = sharder.write_safetensors

    def write_and_release(path, *args, **kwargs):
        out = real_write(path, *args, **kwargs)
        if hub.released_by_event is None:  # the last file is still held
            written_before_last.append(path.name)
        hub.release.set()
        return out

    monkeypatch.setattr(sharder, "write_safetensors", write_and_release)
    try:
        hub.add_folder("acme/streamed", tiny)
        m = shard_model("acme/streamed", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    finally:
        hub.stop()
    local = shard_model(tiny, tmp_path / "local", progress=False)

    # The embeddings (all in the first file) were written while the last file was still on its way.
    assert hub.released_by_event is True
    assert "embeddings.safetensors" in written_before_last
    assert [e.to_dict() for e in m.files] == [e.to_dict() for e in local.files]
