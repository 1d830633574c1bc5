"""azu shard on local folders: every family, single-file and sharded checkpoints, tied heads, MoE,
determinism, refusals (pickle-only, corrupt files, unsafe index paths) and the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from azu.cli import main as cli_main
from azu.cli.demo import FAMILIES, build_model
from azu.engine.naming import classify_tensor
from azu.errors import IntegrityFailure, InvalidRequest, UnsafeFormat
from azu.registry.download import sha256_file
from azu.registry.manifest import Manifest, load_verified
from azu.registry.sharder import shard_model
from tests.support import REPO


def _source_tensors(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every demo family, saved single-file and sharded (tiny: ~1 MB each)."""
    root = tmp_path_factory.mktemp("models")
    built = {}
    for family in FAMILIES:
        built[(family, False)] = build_model(family, root / f"{family}-single")
        built[(family, True)] = build_model(family, root / f"{family}-sharded", max_shard_size="100KB")
    return built


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_lands_in_exactly_one_shard(models, tmp_path, family, sharded):
    src = models[(family, sharded)]
    assert (src / "model.safetensors.index.json").exists() == sharded
    out = tmp_path / "out"
    manifest = shard_model(src, out, progress=False)

    source = _source_tensors(src)
    config = json.loads((src / "config.json").read_text())
    reloaded = Manifest.load(out)
    assert reloaded.to_dict() == manifest.to_dict()
    assert manifest.config == config and manifest.architecture == config["architectures"][0]
    assert [e.layer for e in manifest.files if e.kind == "layer"] == list(range(manifest.num_layers))
    assert manifest.num_layers == 4 and manifest.torch_dtype == "float32"

    seen: dict[str, str] = {}
    for entry in manifest.files:
        path = out / entry.name
        assert sha256_file(path) == entry.sha256 and path.stat().st_size == entry.size
        with safe_open(path, "pt") as f:  # the reference reader accepts our writer's files
            assert f.metadata() == {"format": "pt"}
        tensors = load_verified(out, entry)
        for name, value in tensors.items():
            assert name not in seen, f"{name} in both {seen[name]} and {entry.name}"
            seen[name] = entry.name
            part = classify_tensor(name)
            assert part == (entry.layer if entry.kind == "layer" else entry.kind)
            original = source[name] if name in source else source[_embedding_name(manifest)]
            assert value.dtype == original.dtype and torch.equal(value, original), name

    head = load_verified(out, manifest.head_file)
    if "lm_head.weight" in source:
        assert set(seen) == set(source)
    else:  # tied: the head file carries a clone of the input embedding
        assert manifest.tied_head
        assert set(seen) == set(source) | {"lm_head.weight"}
        assert torch.equal(head["lm_head.weight"], source[_embedding_name(manifest)])
    assert {e.name for e in manifest.extra_files} >= {"config.json", "tokenizer.json",
                                                      "tokenizer_config.json"}
    for extra in manifest.extra_files:
        assert (out / extra.name).read_bytes() == (src / extra.name).read_bytes()
        assert sha256_file(out / extra.name) == extra.sha256


def _embedding_name(manifest: Manifest) -> str:
    names = [n for n in manifest.embeddings_file.tensors
             if n.split(".")[-2] in ("embed_tokens", "wte", "word_embeddings")]
    assert len(names) == 1
    return names[0]


def test_tied_families_are_detected(models, tmp_path):
    gpt2 = shard_model(models[("gpt2", True)], tmp_path / "gpt2", progress=False)
    assert gpt2.tied_head and "lm_head.weight" in gpt2.head_file.tensors
    llama = shard_model(models[("llama", False)], tmp_path / "llama", progress=False)
    assert not llama.tied_head


def test_moe_keeps_per_expert_names(models, tmp_path):
    m = shard_model(models[("mixtral", True)], tmp_path / "mixtral", progress=False)
    names = m.layer_file(2).tensors
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 4 * 3  # 4 experts x (w1, w2, w3), names exactly as on disk
    assert "model.layers.2.block_sparse_moe.experts.3.w2.weight" in names
    assert all(n.startswith("model.layers.2.") for n in names)


def test_sharding_is_deterministic(models, tmp_path):
    src = models[("qwen2_moe", True)]
    a = shard_model(src, tmp_path / "a", progress=False)
    b = shard_model(src, tmp_path / "b", progress=False)
    assert a.to_dict() == b.to_dict()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for entry in a.files:
        assert (tmp_path / "a" / entry.name).read_bytes() == (tmp_path / "b" / entry.name).read_bytes()


def test_resharding_replaces_an_earlier_shard_folder(models, tmp_path):
    out = tmp_path / "out"
    shard_model(models[("llama", False)], out, progress=False)
    (out / "layer_00003.safetensors").write_bytes(b"stale")
    m = shard_model(models[("gpt2", False)], out, progress=False)
    assert Manifest.load(out).model_type == "gpt2"
    assert sha256_file(out / "layer_00003.safetensors") == m.layer_file(3).sha256
    assert not list(tmp_path.glob(".out.*"))  # no staging or old folder left behind


def test_refuses_to_overwrite_a_foreign_folder(models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidRequest, match="not an azu shard folder"):
        shard_model(models[("llama", False)], out, progress=False)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def _pickle_only(tmp_path: Path) -> Path:
    src = tmp_path / "pickled"
    src.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (src / "config.json").write_text(json.dumps(config))
    # Never loaded, so it need not be a real pickle: only its name makes it a pickle checkpoint.
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    return src


def test_pickle_only_folder_is_refused_before_writing(tmp_path):
    src = _pickle_only(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UnsafeFormat, match=r"pytorch_model\.bin"):
        shard_model(src, out, progress=False)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["pickled"]


def test_pickles_next_to_safetensors_are_ignored(models, tmp_path):
    src = tmp_path / "both"
    src.mkdir()
    for f in models[("llama", False)].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 never read")
    m = shard_model(src, tmp_path / "out", progress=False)
    assert not any(".bin" in e.name for e in m.extra_files)


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_source_header_is_refused(models, tmp_path):
    src = _copy_model(models[("llama", False)], tmp_path / "bad")
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) - 100]))  # truncated: the last tensor's range is past the end
    with pytest.raises(IntegrityFailure, match=r"model\.safetensors"):
        shard_model(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", n + 10**9) + bytes(data[8:]))  # header length beyond the file
    with pytest.raises(IntegrityFailure, match="header length"):
        shard_model(src, tmp_path / "out", progress=False)


def test_overlapping_tensors_are_refused(tmp_path):
    src = tmp_path / "overlap"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "model.layers.0.w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(IntegrityFailure, match="overlap"):
        shard_model(src, tmp_path / "out", progress=False)


def test_index_is_checked_against_the_files(models, tmp_path):
    src = _copy_model(models[("llama", True)], tmp_path / "idx")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    real_file = index["weight_map"][name]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != real_file)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(IntegrityFailure, match=name):
        shard_model(src, tmp_path / "out", progress=False)

    index["weight_map"][name] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidRequest, match="unsafe file path"):
        shard_model(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tensors_of_one_layer_split_across_source_files(tmp_path):
    """A layer whose tensors sit in two source files (and files holding parts of several layers)."""
    src = tmp_path / "split"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                 "num_hidden_layers": 2, "vocab_size": 8,
                                                 "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(8, 4, generator=g).to(torch.bfloat16)
         for n in ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
                   "model.layers.1.a.weight", "model.layers.1.b.weight"]}
    t["model.norm.weight"] = torch.ones(4, dtype=torch.bfloat16)
    t["model.layers.1.c.bias"] = torch.arange(3, dtype=torch.float32)  # mixed dtypes in one layer
    files = {"model-1.safetensors": ["model.embed_tokens.weight", "model.layers.0.a.weight",
                                     "model.layers.1.b.weight"],
             "model-2.safetensors": ["model.layers.0.b.weight", "model.layers.1.a.weight",
                                     "model.norm.weight", "model.layers.1.c.bias"]}
    for fname, names in files.items():
        save_file({n: t[n] for n in names}, str(src / fname), metadata={"format": "pt"})
    weight_map = {n: f for f, names in files.items() for n in names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    m = shard_model(src, tmp_path / "out", progress=False)
    assert m.tied_head and m.torch_dtype == "bfloat16" and m.num_layers == 2
    layer1 = load_verified(tmp_path / "out", m.layer_file(1))
    assert sorted(layer1) == ["model.layers.1.a.weight", "model.layers.1.b.weight", "model.layers.1.c.bias"]
    for name, value in layer1.items():
        assert value.dtype == t[name].dtype and torch.equal(value, t[name])
    head = load_verified(tmp_path / "out", m.head_file)
    assert torch.equal(head["lm_head.weight"], t["model.embed_tokens.weight"])


def test_untied_config_without_lm_head_is_refused(tmp_path):
    src = tmp_path / "nohead"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.w": torch.zeros(2)},
              str(src / "model.safetensors"))
    with pytest.raises(InvalidRequest, match="not tied"):
        shard_model(src, tmp_path / "out", progress=False)


# -- CLI ---------------------------------------------------------------------------------------------------
def _azu(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "azu.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=False)


def test_cli_json_output_and_progress(models, tmp_path):
    out = tmp_path / "out"
    proc = _azu("shard", str(models[("gpt2", True)]), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    manifest = Manifest.load(out)
    assert summary["num_layers"] == manifest.num_layers == 4
    assert summary["tied_head"] is True
    assert [f["sha256"] for f in summary["files"]] == [e.sha256 for e in manifest.files]
    assert summary["directory"] == str(out)
    assert "sharding" in proc.stderr and "100%" in proc.stderr  # the progress bar goes to stderr


def test_cli_refuses_pickle_only_with_nonzero_exit(tmp_path):
    src = _pickle_only(tmp_path)
    proc = _azu("shard", str(src), "--out", str(tmp_path / "out"), "--json", "--quiet")
    assert proc.returncode == 2
    assert "pytorch_model.bin" in proc.stderr and "safetensors" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "unsafe_format"
    assert not (tmp_path / "out").exists()


def test_cli_in_process_quiet_and_missing_source(models, tmp_path, capsys):
    assert cli_main(["shard", str(models[("opt", False)]), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "4 layers" in captured.out and captured.err == ""
    assert cli_main(["shard", str(tmp_path / "nope" / "x y"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "neither a folder nor" in capsys.readouterr().err
