"""Stage behaviour beyond exact match: sampling, isolation of jobs, bounds, integrity, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from azu.engine.local import LocalPipeline, split_layers
from azu.engine.sampling import SamplingParams, sample, scores
from azu.engine.span import Span
from azu.engine.stage import Stage
from azu.errors import CacheFull, IntegrityFailure, InvalidRequest, UnsupportedArchitecture
from azu.registry.manifest import Manifest


def test_seeded_sampling_repeats_and_seeds_differ(built):
    pipe = LocalPipeline(built("llama").shards, 2)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50)
    prompt = built("llama").prompt()
    a = pipe.generate(prompt, max_tokens=16, params=params, seed=7).token_ids
    b = pipe.generate(prompt, max_tokens=16, params=params, seed=7).token_ids
    c = pipe.generate(prompt, max_tokens=16, params=params, seed=8).token_ids
    assert a == b
    assert a != c


def test_sample_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, SamplingParams(), seed=0, step=0) == 1
    # top_k=2 never draws outside the two best
    draws = {sample(logits, SamplingParams(temperature=5.0, top_k=2), seed=0, step=s) for s in range(200)}
    assert draws == {1, 2}
    # a tiny top_p keeps only the best token
    assert {
        sample(logits, SamplingParams(temperature=5.0, top_p=0.01), seed=0, step=s) for s in range(50)
    } == {1}
    with pytest.raises(InvalidRequest):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequest):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("case", ["random", "ties", "nan", "all -inf", "inf", "strided"])
def test_sample_takes_torchs_argmax(case: str) -> None:
    """Greedy sampling runs NumPy's argmax: the same index as torch.argmax on ties (the first), NaN (the
    first NaN), infinities and a strided view."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 32000, generator=g)
    if case == "ties":
        logits[:, [5, 17, 31999]] = 100.0
    elif case == "nan":
        logits[:, [9, 12]] = float("nan")
        logits[:, 3] = float("inf")
    elif case == "all -inf":
        logits[:] = float("-inf")
    elif case == "inf":
        logits[:, [40, 7]] = float("inf")
    rows = logits[:, ::2] if case == "strided" else logits
    for row in rows:
        assert sample(row, SamplingParams(), seed=0, step=0) == int(torch.argmax(row))
    # and through the Gumbel path (temperature > 0): the noisy scores, cut tokens at -inf
    params = SamplingParams(temperature=0.7, top_k=50)
    for step, row in enumerate(rows):
        noisy = scores(row, params, seed=1, step=step)
        assert sample(row, params, seed=1, step=step) == int(torch.argmax(noisy))


def test_interleaved_jobs_keep_separate_caches(built):
    """Several jobs stepping in turn through the same stages each get generate's tokens."""
    b = built("qwen2")
    pipe = LocalPipeline(b.shards, 2)
    prompts = [b.prompt(), b.prompt()[5:], b.prompt()[::-1]]
    alone = [pipe.generate(p, max_tokens=10).token_ids for p in prompts]
    jobs = {f"job{i}": torch.tensor(p) for i, p in enumerate(prompts)}
    got: dict[str, list[int]] = {j: [] for j in jobs}
    for _ in range(10):
        for job_id, x in list(jobs.items()):
            token = int(pipe.step(job_id, x).argmax())
            got[job_id].append(token)
            jobs[job_id] = torch.tensor([token])
    assert [got[f"job{i}"] for i in range(3)] == alone
    assert pipe.stages[0].job_length("job0") == len(prompts[0]) + 9


def test_end_job_frees_cache_and_bound_refuses(built):
    shards = built("llama").shards
    m = Manifest.load(shards)
    stage = Stage.load(shards, Span(0, m.num_layers, embeddings=True, head=True), max_cached_tokens=50)
    stage.forward("a", torch.arange(10, 40))
    assert stage.cached_tokens == 30
    with pytest.raises(CacheFull, match="50 tokens"):
        stage.forward("b", torch.arange(10, 40))
    assert "b" not in stage.jobs  # a refused job leaves nothing behind
    stage.end_job("a")
    assert stage.cached_tokens == 0 and stage.jobs == []
    stage.forward("b", torch.arange(10, 40))  # room again
    stage.end_job("unknown")  # no-op


def test_context_limit(built):
    shards = built("gpt2").shards  # n_positions 512
    m = Manifest.load(shards)
    stage = Stage.load(shards, Span(0, m.num_layers, embeddings=True, head=True))
    with pytest.raises(InvalidRequest, match="context"):
        stage.forward("a", torch.zeros(513, dtype=torch.long))


def test_bad_inputs_are_refused(built):
    shards = built("llama").shards
    first = Stage.load(shards, Span(0, 2, embeddings=True, head=False))
    second = Stage.load(shards, Span(2, 4, embeddings=False, head=True))
    with pytest.raises(InvalidRequest):
        first.forward("j", torch.tensor([1.5, 2.0]))
    with pytest.raises(InvalidRequest):
        first.forward("j", torch.tensor([10_000]))
    with pytest.raises(InvalidRequest):
        second.forward("j", torch.zeros(3, 7))
    with pytest.raises(InvalidRequest):
        Span(2, 2, embeddings=False, head=False)
    with pytest.raises(InvalidRequest):
        Span(1, 2, embeddings=True, head=False)
    with pytest.raises(InvalidRequest):
        Stage.load(shards, Span(0, 2, embeddings=True, head=True))  # head needs the last layer


def test_stage_loads_only_its_own_files(built, tmp_path):
    """A worker holding layers 2..3 never needs (or reads) the embeddings or other layers' files."""
    shards = built("mistral").shards
    m = Manifest.load(shards)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(shards / "manifest.json", partial)
    for entry in m.files_for(2, 4, embeddings=False, head=True):
        shutil.copy(shards / entry.name, partial)
    stage = Stage.load(partial, Span(2, 4, embeddings=False, head=True))
    hidden = torch.randn(5, m.hidden_size)
    assert stage.forward("j", hidden).shape == (m.vocab_size,)


def test_tampered_file_is_refused_by_name(built, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(built("llama").shards, shards)
    target = shards / "layer_00001.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor's bytes
    target.write_bytes(bytes(data))
    Stage.load(shards, Span(2, 4, embeddings=False, head=True))  # does not touch layer 1
    with pytest.raises(IntegrityFailure, match=r"layer_00001\.safetensors"):
        Stage.load(shards, Span(0, 2, embeddings=True, head=False))


def test_unsupported_architecture_is_named(built, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(built("llama").shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["model_type"] = manifest["config"]["model_type"] = "t5"
    manifest["architecture"] = manifest["config"]["architectures"][0] = "T5ForConditionalGeneration"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedArchitecture, match="T5ForConditionalGeneration"):
        Stage.load(shards, Span(0, 2, embeddings=True, head=False))


def test_split_layers():
    spans = split_layers(24, 3)
    assert [(s.first, s.last) for s in spans] == [(0, 8), (8, 16), (16, 24)]
    assert spans[0].embeddings and not spans[0].head and spans[-1].head
    with pytest.raises(InvalidRequest):
        split_layers(2, 3)


@pytest.mark.slow  # starts a fresh Python process that imports torch and transformers
def test_generate_cli_json(built):
    b = built("llama")
    prompt = ",".join(map(str, b.prompt()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "azu.cli",
            "generate",
            str(b.shards),
            "--stages",
            "2",
            "--prompt-ids",
            prompt,
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["token_ids"] == b.reference()


@pytest.mark.slow  # starts a fresh Python process that imports torch and transformers
def test_generate_cli_text_prompt_and_errors(tmp_path):
    from azu.cli import demo
    from azu.registry.sharder import shard_model

    src = demo.build_model("llama", tmp_path / "src")  # with the demo tokenizer
    shard_model(src, tmp_path / "shards", progress=False)
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "azu.cli",
            "generate",
            str(tmp_path / "shards"),
            "--stages",
            "2",
            "--prompt",
            "Hello, azu",
            "--max-tokens",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert 1 <= len(result["token_ids"]) <= 5 and "text" in result
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "azu.cli",
            "generate",
            str(tmp_path / "shards"),
            "--stages",
            "9",
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "cannot split 4 layers into 9 stages" in bad.stderr


def test_a_stage_holds_the_dtype_it_was_asked_for(tmp_path):
    """A bfloat16 checkpoint (most hub models) loaded as float32 gives float32 weights, equal to the file's.

    The skeleton used to be built in the config's dtype, so transformers cast every float32 tensor back to
    bfloat16: the stage silently computed in bfloat16, after a float32 copy of each file (peak 1.9x).
    """
    import transformers

    from azu.cli import demo
    from azu.registry.sharder import shard_model

    src = demo.build_model("llama", tmp_path / "src", with_tokenizer=False)
    bf16 = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf16)
    manifest = shard_model(bf16, tmp_path / "shards", progress=False)
    assert manifest.torch_dtype == "bfloat16"
    reference = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    expected = {name: p.detach().float() for name, p in reference.named_parameters()}

    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        stage = Stage.load(tmp_path / "shards", Span(0, manifest.num_layers, embeddings=True, head=True),
                           dtype=dtype)
        held = {name: p for name, p in stage.model.named_parameters() if not p.is_meta}
        assert {p.dtype for p in held.values()} == {torch_dtype}
        for name, p in held.items():
            assert torch.equal(p.float(), expected[name]), name
