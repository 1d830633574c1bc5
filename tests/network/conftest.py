"""Fixtures for the pipeline: a Redis database of its own, tiny sharded models, a registry over HTTP and
real Celery worker processes (``celery -A workers worker -Q gpu.<id> --pool solo``).

The worker processes are started once per test session (torch takes seconds to import on this machine)
and shared; each test uses its own model ids and job ids, so tests do not see each other's state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.network import REDIS_URL, SECRET, Cluster, serve_registry

# Set before `workers`/celeryconfig are imported anywhere in this process: the broker is this database.
os.environ["REDIS_URL"] = REDIS_URL
os.environ["AUTH_SECRET_KEY"] = SECRET


@pytest.fixture(scope="session")
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def net_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("network")


@pytest.fixture(scope="session")
def registry_dir(net_dir: Path) -> Path:
    path = net_dir / "registry"
    path.mkdir()
    os.environ["AZU_REGISTRY_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def source_model(net_dir: Path) -> Path:
    """A tiny random Llama (4 layers, hidden 64) saved as a Hugging Face folder."""
    from azu.cli.demo import build_model

    return build_model("llama", net_dir / "src-llama", seed=7)


@pytest.fixture(scope="session")
def hf_model(source_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source_model).eval()


@pytest.fixture(scope="session")
def reference(hf_model: Any) -> Callable[[list[int], int], list[int]]:
    """transformers' greedy ``generate`` on the same weights: new tokens, cut before the first eos."""
    import torch

    def run(prompt: list[int], max_new: int) -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        new = out[0, len(prompt):].tolist()
        eos = hf_model.config.eos_token_id
        return new[:new.index(eos)] if eos in new else new

    return run


@pytest.fixture(scope="session")
def shard(r: redis.Redis, registry_dir: Path, source_model: Path) -> Callable[[str], str]:
    """Shard the tiny model into the registry under a new model id (once per id) and mark it ready."""
    from azu.registry import status as models
    from azu.registry.sharder import shard_model

    done: set[str] = set()

    def make(model_id: str) -> str:
        if model_id not in done:
            out = models.shard_dir(model_id)
            if not (out / "manifest.json").exists():
                shard_model(str(source_model), out, progress=False)
            models.mark_ready(r, model_id, source=str(source_model))
            done.add(model_id)
        return model_id

    return make


@pytest.fixture(scope="session")
def registry_http(registry_dir: Path) -> Iterator[Any]:
    """A static-file registry over real HTTP; ``server.tamper[(model, file)]`` can corrupt what it serves."""
    server = serve_registry()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def cluster(r: redis.Redis, net_dir: Path, registry_dir: Path, registry_http: Any) -> Iterator[Cluster]:
    """Three GPU-queue workers (w1, w2, w3) and one core+registry worker, all real processes."""
    c = Cluster(r, net_dir, registry_http.url)
    try:
        for wid in ("w1", "w2", "w3"):
            c.start_gpu(wid)
        c.start_core()
        c.wait_live("w1", "w2", "w3")
        c.wait_core()
        yield c
    finally:
        c.stop_all()


@pytest.fixture(scope="session")
def celery_dispatch(r: redis.Redis) -> Any:
    """The Celery dispatcher of this process (the test plays the API's part)."""
    import workers
    from azu.network.dispatch import get_dispatcher

    workers.use_broker(REDIS_URL)
    return get_dispatcher()


@pytest.fixture
def clean_dirs(registry_dir: Path) -> Iterator[None]:
    yield
    for p in registry_dir.glob("*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
