"""Fixtures of the metrics tests: a private real redis-server (never the shared one) and the demo model
sharded into a registry folder of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import MODEL_ID
from tests.support.redis_server import private_redis


@pytest.fixture(scope="session")
def metrics_redis_url(tmp_path_factory) -> Iterator[str]:
    with private_redis(tmp_path_factory.mktemp("metrics-redis")) as url:
        yield url


@pytest.fixture(scope="session")
def metrics_registry_dir(tmp_path_factory) -> Path:
    from azu.cli.demo import build_demo_model
    from azu.registry.sharder import shard_model

    src = build_demo_model(tmp_path_factory.mktemp("metrics-models") / MODEL_ID)
    root = tmp_path_factory.mktemp("metrics-registry")
    shard_model(src, root / MODEL_ID, progress=False)
    return root
