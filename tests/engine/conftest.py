"""Engine fixtures: ``built(family)`` builds a tiny model of that family once per test session."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.engine import Built


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Callable[[str], Built]:
    cache: dict[str, Built] = {}

    def get(family: str) -> Built:
        if family not in cache:
            cache[family] = Built(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get
