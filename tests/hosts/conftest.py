"""Fixtures of the host tests: the demo model sharded into a registry folder, its tokenizer, transformers'
greedy reference, and a fresh set of network namespaces per test (removed even when the test fails)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hosts import MODEL_ID, Hosts, require_hosts


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    from azu.cli.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory, demo_src) -> Path:
    from azu.registry.sharder import shard_model

    root = tmp_path_factory.mktemp("registry")
    shard_model(demo_src, root / MODEL_ID, progress=False)
    return root


@pytest.fixture(scope="session")
def tokenizer(registry_dir):
    from azu.tokenization import load_tokenizer

    return load_tokenizer(registry_dir / MODEL_ID)


@pytest.fixture(scope="session")
def reference(demo_src) -> Callable[[list[int], int], list[int]]:
    """transformers' own greedy ``generate`` on the demo weights: the tokens azu must reproduce."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(demo_src).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        return out[0, len(prompt_ids):].tolist()

    return generate


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """A core namespace and two worker namespaces on a private bridge."""
    require_hosts()
    with Hosts(2) as h:
        yield h
