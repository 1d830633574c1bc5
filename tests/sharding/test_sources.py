"""azu.registry.sources: one rule for model ids, one pickle list, and no import back into the sharder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from azu.errors import Forbidden, InvalidRequest, NotFound, UnsafeFormat
from azu.registry import sources
from azu.registry.download import PICKLE_SUFFIXES
from azu.registry.sharder import shard_model
from tests.support import REPO


def test_sources_does_not_depend_on_the_sharder() -> None:
    code = "import sys, azu.registry.sources; print('azu.registry.sharder' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("model_id", ["org/name", "name", "Qwen/Qwen2.5-0.5B", "a_b/c.d-e"])
def test_hub_ids_accepted(model_id: str) -> None:
    assert sources.is_hub_id(model_id)
    assert sources.validate_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", ["org/../etc", "a/b/c", "-x", "org/-x", "", "/abs", "é/x"])
def test_bad_ids_refused_everywhere(model_id: str, tmp_path: Path) -> None:
    assert not sources.is_hub_id(model_id)
    with pytest.raises(InvalidRequest):
        sources.validate_model_id(model_id)
    if model_id and not Path(model_id).exists():
        # The sharder applies the same rule before it would ask the hub for anything.
        with pytest.raises(NotFound, match="neither a folder nor a Hugging Face model id"):
            shard_model(model_id, tmp_path / "out", progress=False)


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_every_pickle_suffix_is_refused(suffix: str) -> None:
    with pytest.raises(UnsafeFormat, match="pickle"):
        sources.select_weight_files([f"weights{suffix}", "config.json"], None, where="repo")


def test_local_folders_only_under_the_allowed_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    (allowed / "m1").mkdir(parents=True)
    (other / "m2").mkdir(parents=True)
    monkeypatch.setenv("AZU_ALLOWED_MODEL_DIRS", str(allowed))
    assert sources.resolve_request(str(allowed / "m1")) == ("m1", str((allowed / "m1").resolve()))
    with pytest.raises(Forbidden):
        sources.resolve_request(str(other / "m2"))
    with pytest.raises(Forbidden):
        sources.resolve_request(str(allowed / ".." / "other" / "m2"))
    monkeypatch.delenv("AZU_ALLOWED_MODEL_DIRS")
    with pytest.raises(Forbidden, match="not set"):
        sources.check_local_source(str(allowed / "m1"))
