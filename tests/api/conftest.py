"""Fixtures of the API tests: a private real Redis, the demo model sharded into a registry folder, a Flask
test client, and whole networks (API over gunicorn, scheduler, N worker processes) started for real.

The Redis is a real redis-server (the Redis >= 7 `azu up` ships) on a free loopback port, so these tests
neither see nor disturb what other test folders keep in the shared server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.api import MODEL_ID, Network, start_network
from tests.support.redis_server import as_broker, private_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of these tests' own (the Redis >= 7 `azu up` ships), this process's broker meanwhile."""
    with private_redis(tmp_path_factory.mktemp("redis")) as url, as_broker(url):
        yield url


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    from azu.cli.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory, demo_src) -> Iterator[Path]:
    from azu.registry.sharder import shard_model

    root = tmp_path_factory.mktemp("registry")
    shard_model(demo_src, root / MODEL_ID, progress=False)
    old = os.environ.get("AZU_REGISTRY_DIR")
    os.environ["AZU_REGISTRY_DIR"] = str(root)  # azu.registry.status.shard_dir reads it at call time
    yield root
    if old is None:
        os.environ.pop("AZU_REGISTRY_DIR", None)
    else:
        os.environ["AZU_REGISTRY_DIR"] = old


@pytest.fixture(scope="session")
def r(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def app(redis_url, registry_dir, r):
    from azu.billing.base import FreeBilling
    from web import create_app

    r.flushdb()  # no workers, jobs or model states left by an earlier test (no network runs meanwhile)

    # FreeBilling explicitly: these tests are about the API, not the ledger (DATABASE_URL may be set).
    return create_app({"TESTING": True, "REDIS_URL": redis_url, "AZU_BILLING": FreeBilling()})


@pytest.fixture
def client(app):
    return app.test_client()


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


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}workers")
def network(request, redis_url, registry_dir, tmp_path_factory) -> Iterator[Network]:
    """A whole network with 2, then 3 workers (pytest tears the first down before starting the second)."""
    n = request.param
    net = start_network(n, redis_url=redis_url, registry_dir=registry_dir,
                        root=tmp_path_factory.mktemp(f"net{n}"))
    yield net
    net.group.stop()
