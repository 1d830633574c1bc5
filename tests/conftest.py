"""Shared fixtures. Area fixtures live in the conftest.py of each tests/ subfolder."""

from __future__ import annotations

import os

# Two cores here: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")

