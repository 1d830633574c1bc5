"""Registry tasks (queue ``registry``). Thin: the work is azu.registry.status.run_shard."""

from __future__ import annotations

from typing import Any

import redis

from azu.config import redis_url
from azu.registry import status as models
from workers import app


@app.task(name="workers.registry.shard", ignore_result=True)
def shard(*, model_id: str, source: str) -> dict[str, Any]:
    """Shard ``source`` into the registry as ``model_id``; the outcome is recorded in the model's status."""
    r = redis.Redis.from_url(redis_url())
    return models.run_shard(r, model_id, source)
