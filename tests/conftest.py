"""Shared fixtures. Area fixtures live in the conftest.py of each tests/ subfolder; every other helper
lives in tests/support (imported from there by conftests and test modules alike)."""

from __future__ import annotations

import os

import pytest

# The helpers in tests/support assert too: rewrite them like test modules so a failure shows its values.
pytest.register_assert_rewrite("tests.support")

# Two cores here: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")

