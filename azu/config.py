"""Settings read from the environment, in one place. Every variable is documented in README.md."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def redis_url() -> str:
    """REDIS_URL wins; else REDIS_HOST/REDIS_PORT (the seed's variables); else the local default."""
    url = _env("REDIS_URL")
    if url:
        return url
    host = _env("REDIS_HOST", "127.0.0.1")
    port = _int("REDIS_PORT", 6379)
    return f"redis://{host}:{port}/0"


@dataclass(frozen=True)
class Settings:
    """Settings the web app reads here. Each other variable is read where it is used, with its default
    next to the code (README.md lists them all)."""

    database_url: str = field(default_factory=lambda: _env("DATABASE_URL", "") or "")
    registry_url: str = field(default_factory=lambda: _env("REGISTRY_URL", "http://127.0.0.1:8002") or "")


def load_settings() -> Settings:
    return Settings()
