"""The engine's stages, run from shard files, give transformers' greedy tokens exactly."""

from __future__ import annotations

import pytest

from azu.cli import demo
from azu.engine.local import LocalPipeline
from tests.support.engine import NEW_TOKENS

FAMILIES = sorted(demo.FAMILIES)  # every supported family + "stablelm" (the generic fallback)

# Two stages already split every family; three and four add seconds to the quick (-m "not slow") loop.
MORE_STAGES = [pytest.param(n, marks=pytest.mark.slow) for n in (3, 4)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stages", [2, *MORE_STAGES])
def test_stages_match_generate(built, family, stages):
    b = built(family)
    pipe = LocalPipeline(b.shards, stages)
    got = pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids
    assert got == b.reference()


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_matches(built, family):
    """A checkpoint saved as several files (model.safetensors.index.json) shards and runs the same."""
    b = built(family)
    pipe = LocalPipeline(b.shards_from_sharded, 3)
    assert pipe.generate(b.prompt(), max_tokens=NEW_TOKENS).token_ids == b.reference()


def test_reference_is_not_degenerate(built):
    """Guard against a vacuous comparison: the reference tokens of llama-like models vary."""
    assert len(set(built("llama").reference())) > 8
    assert len(set(built("deepseek_v2").reference())) > 8
