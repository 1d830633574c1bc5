"""azu.registry.manifest: round trip, lookups and verified loading (hash checked before parsing)."""

from __future__ import annotations

import mmap
import os

import pytest
import torch
from safetensors.torch import save_file

from azu.errors import IntegrityFailure, InvalidRequest, NotFound
from azu.registry.download import sha256_file
from azu.registry.manifest import FileEntry, LoadedFiles, Manifest, load_verified, read_verified_bytes


def _entry(directory, name, kind, layer, tensors):
    path = directory / name
    save_file(tensors, str(path), metadata={"format": "pt"})
    return FileEntry(name=name, kind=kind, layer=layer, sha256=sha256_file(path), size=path.stat().st_size,
                     tensors=tuple(sorted(tensors)))


@pytest.fixture
def shard_dir(tmp_path):
    files = [
        _entry(tmp_path, "embeddings.safetensors", "embeddings", None, {"e.weight": torch.ones(4, 2)}),
        _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"layers.0.w": torch.arange(6.0)}),
        _entry(tmp_path, "layer_00001.safetensors", "layer", 1, {"layers.1.w": torch.arange(3.0)}),
        _entry(tmp_path, "head.safetensors", "head", None, {"lm_head.weight": torch.zeros(4, 2)}),
    ]
    m = Manifest(model_id="t", source_revision=None, architecture="LlamaForCausalLM", model_type="llama",
                 num_layers=2, hidden_size=2, vocab_size=4, tied_head=False, torch_dtype="float32",
                 config={"model_type": "llama"}, files=files)
    m.save(tmp_path)
    return tmp_path


def test_round_trip_and_lookup(shard_dir):
    m = Manifest.load(shard_dir)
    assert m.layer_file(1).name == "layer_00001.safetensors"
    assert m.embeddings_file.tensors == ("e.weight",)
    assert m.head_file.name == "head.safetensors"
    names = [e.name for e in m.files_for(1, 2, embeddings=False, head=True)]
    assert names == ["layer_00001.safetensors", "head.safetensors"]
    assert [e.name for e in m.files_for(0, 1, embeddings=True, head=False)] == [
        "embeddings.safetensors", "layer_00000.safetensors"]
    with pytest.raises(InvalidRequest):
        m.files_for(0, 3, embeddings=False, head=False)
    with pytest.raises(NotFound):
        m.layer_file(5)
    assert Manifest.load(shard_dir).to_dict() == m.to_dict()


def test_load_verified_returns_tensors(shard_dir):
    m = Manifest.load(shard_dir)
    t = load_verified(shard_dir, m.layer_file(0))
    assert torch.equal(t["layers.0.w"], torch.arange(6.0))


def test_a_loaded_files_pages_can_be_given_back_tensor_by_tensor(tmp_path):
    big, small = torch.arange(40_000.0), torch.arange(5.0)  # 160 kB: dozens of whole pages inside
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"a.big": big, "b.small": small})
    files = LoadedFiles()
    tensors = files.load(tmp_path, entry)
    freed = files.release(tensors["a.big"])
    # The pages wholly inside the tensor went back (they read as zeros now); its partial end pages and the
    # other tensor are untouched.
    assert freed >= big.numel() * 4 - 2 * mmap.PAGESIZE and freed % mmap.PAGESIZE == 0
    zeros = int((tensors["a.big"] == 0).sum()) - 1  # arange starts at 0
    assert zeros == freed // 4
    assert torch.equal(tensors["b.small"], small)
    assert files.release(torch.ones(4)) == 0  # not from a loaded file: nothing to give back


def _mapped(address: int) -> bool:
    """Whether this process has a mapping holding ``address`` (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_a_loaded_file_is_unmapped_once_its_tensors_are_dropped(tmp_path):
    # A float32 stage from bfloat16 files keeps only cast copies: each file's bytes must go as soon as its
    # tensors do, not when the whole stage has loaded (every file's bytes were held to the end before).
    big = torch.arange(400_000.0)  # 1.6 MB: an anonymous mapping of its own
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"a.big": big})
    files = LoadedFiles()
    tensors = files.load(tmp_path, entry)
    address = tensors["a.big"].data_ptr()
    kept = tensors["a.big"].to(torch.float64)  # a cast copy, as a stage in another dtype keeps
    assert _mapped(address)
    del tensors
    assert not _mapped(address) and files.release(kept) == 0
    assert torch.equal(kept, big.to(torch.float64))


def test_narrower_tensors_are_widened_block_by_block_into_pages_that_can_be_given_back(tmp_path, monkeypatch):
    # A float32 stage from bfloat16 files (most hub models on a CPU worker). The cast copies must be pages
    # ``release`` can give back (a layout's copy of a heap-allocated cast held two copies of the weight), and
    # the file's bytes go as they are cast (the file and its whole cast copy were held at once).
    monkeypatch.setattr(LoadedFiles, "WIDEN_BLOCK", 4096)  # several blocks in one tensor
    big = torch.linspace(-3, 3, 100_000).to(torch.bfloat16)  # 200 kB in the file, 400 kB widened
    half, ids = torch.arange(7.0).to(torch.float16), torch.arange(5)
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0,
                   {"a.big": big, "b.half": half, "c.ids": ids, "d.wide": torch.ones(3)})
    files = LoadedFiles()
    tensors = files.load(tmp_path, entry, widen_to=torch.float32)
    assert {k: t.dtype for k, t in tensors.items()} == {
        "a.big": torch.float32, "b.half": torch.float32, "c.ids": torch.int64, "d.wide": torch.float32}
    assert torch.equal(tensors["a.big"], big.float()) and torch.equal(tensors["b.half"], half.float())
    assert torch.equal(tensors["c.ids"], ids) and torch.equal(tensors["d.wide"], torch.ones(3))
    # Each cast tensor starts on a page of its own: all of its whole pages can be given back.
    assert tensors["a.big"].data_ptr() % mmap.PAGESIZE == 0
    assert files.release(tensors["a.big"]) == big.numel() * 4 // mmap.PAGESIZE * mmap.PAGESIZE
    # Not cast where the file is as wide already, or where the stage's dtype is narrower.
    same = files.load(tmp_path, entry, widen_to=torch.float16)
    assert same["a.big"].dtype == torch.bfloat16 and same["b.half"].dtype == torch.float16


def test_widening_gives_back_the_files_bytes_as_it_casts(tmp_path):
    big = torch.linspace(-3, 3, 400_000).to(torch.bfloat16)  # 800 kB: an anonymous mapping of its own
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"a.big": big})
    files, given_back = LoadedFiles(), []
    give_back = files._give_back  # what release() does, without a checksum (none is kept of a file's bytes)
    files._give_back = lambda t: given_back.append((t.dtype, give_back(t))) or given_back[-1][1]  # type: ignore
    wide = files.load(tmp_path, entry, widen_to=torch.float32)
    assert torch.equal(wide["a.big"], big.float())
    assert [d for d, _ in given_back] == [torch.bfloat16]  # one block here: WIDEN_BLOCK elements
    assert given_back[0][1] >= big.numel() * 2 - 2 * mmap.PAGESIZE  # the file's bytes, while casting


def test_a_file_whose_tensors_share_bytes_is_refused(tmp_path):
    # A crafted header can put two tensors on the same bytes (safetensors' own reader refuses it). A stage
    # gives a tensor's pages back once it has cast or copied it: the other would then read zeros, silently.
    import json
    import struct

    data = bytes(range(16))
    header = json.dumps({"a.w": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]},
                         "b.w": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 16]}}).encode()
    path = tmp_path / "layer_00000.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    entry = FileEntry(name=path.name, kind="layer", layer=0, sha256=sha256_file(path),
                      size=path.stat().st_size, tensors=("a.w", "b.w"))
    with pytest.raises(IntegrityFailure, match=r"a\.w and b\.w share bytes"):
        LoadedFiles().load(tmp_path, entry, widen_to=torch.float32)


def test_tampered_file_is_refused_naming_it(shard_dir):
    m = Manifest.load(shard_dir)
    path = shard_dir / "layer_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityFailure, match=r"layer_00000\.safetensors"):
        load_verified(shard_dir, m.layer_file(0))
    with pytest.raises(IntegrityFailure, match=r"layer_00000\.safetensors"):
        read_verified_bytes(path, m.layer_file(0).sha256)


def test_truncated_file_is_refused_by_size(shard_dir):
    m = Manifest.load(shard_dir)
    path = shard_dir / "head.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IntegrityFailure, match="size"):
        load_verified(shard_dir, m.head_file)


def test_missing_manifest_and_bad_format(tmp_path):
    with pytest.raises(NotFound):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other/9"}')
    with pytest.raises(InvalidRequest, match="format"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])  # the file's bytes; a cast copy of them
def test_bytes_given_back_are_read_again_from_the_file_and_checked(tmp_path, stored):
    # What a stage moving off ONNX Runtime's packed weights needs (azu.engine.kernels.LayoutSwitch): the
    # rows it gave back, bit for bit, from the file (cast again where the stage widened them).
    weight = torch.linspace(-2, 2, 300_000).reshape(600, 500)
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"w": weight.to(stored)})
    files = LoadedFiles(restorable=True)
    w = files.load(tmp_path, entry, widen_to=torch.float32)["w"]
    expected = weight.to(stored).float()
    block, untouched = w[100:400], w[400:]  # rows of it, as a stage's blocks are
    assert files.can_restore(block) and not files.can_restore(w.t()) and not files.can_restore(torch.ones(3))
    assert files.release(block) > 0
    assert not torch.equal(block, expected[100:400])  # given back: the pages read as zeros now
    files.restore(block)
    assert torch.equal(block, expected[100:400]) and torch.equal(untouched, expected[400:])
    files.restore(block)  # restoring bytes that are there reads them again, and they still match
    assert files.release(block) > 0 and files.release(block) > 0  # again and again: one checksum, kept
    files.restore(block)
    assert torch.equal(w, expected)
    files.restore(w[:50])  # never given back: left as it is
    # Without ``restorable``, nothing is checksummed and nothing can be read again.
    plain = LoadedFiles()
    other = plain.load(tmp_path, entry, widen_to=torch.float32)["w"]
    assert not plain.can_restore(other[:10])


def _a_block_given_back(tmp_path, rows: int, first: int, last: int):
    """A float32 weight of ``rows`` x 500 loaded from a file, rows ``first:last`` of it given back; (the
    LoadedFiles, the block, the weight, the file)."""
    weight = torch.arange(rows * 500, dtype=torch.float32).reshape(rows, 500)
    entry = _entry(tmp_path, "layer_00000.safetensors", "layer", 0, {"w": weight})
    files = LoadedFiles(restorable=True)
    block = files.load(tmp_path, entry)["w"][first:last]
    files.release(block)
    return files, block, weight, tmp_path / entry.name


def test_bytes_changed_on_disk_are_refused_and_given_back_again(tmp_path):
    files, block, _, path = _a_block_given_back(tmp_path, 800, 200, 600)
    data = bytearray(path.read_bytes())
    data[-4 * 500 * 300] ^= 1  # one bit of row 500, inside the block
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityFailure, match="changed on disk"):
        files.restore(block)
    assert not block[100:300].any()  # the bytes read were given back, not left for a reader
    path.write_bytes(bytes(data[: len(data) // 2]))  # and a file cut short
    with pytest.raises(IntegrityFailure, match="shorter"):
        files.restore(block)


def test_a_file_swapped_on_disk_is_not_followed_when_bytes_are_read_again(tmp_path):
    files, block, weight, path = _a_block_given_back(tmp_path, 600, 100, 500)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(600, 500)}, str(other))
    os.replace(other, path)  # a new file under the old name
    files.restore(block)  # read through the descriptor opened at load: the verified file's bytes
    assert torch.equal(block, weight[100:500])
