"""Helpers shared by the test folders: everything that is not a fixture lives here, one module per area.

Fixtures stay in each folder's conftest.py and import from here; test modules import from here too, never
from a conftest (pytest imports a conftest under its own module name, so a second import makes a second
copy of every class in it).

    tests.support           REPO, wait_for
    tests.support.api       MODEL_ID, Network, start_network: whole networks over gunicorn for tests/api
    tests.support.network   the pipeline's Redis database, RegistryHandler, Cluster, Recording, InlineNetwork
    tests.support.database  ADMIN_URL, create_database/drop_database, LEDGER_TABLES, BOOKS_CHECK
    tests.support.chain     deploy_reverting_contract, FaultyChain (+ Crash)
    tests.support.payouts   THRESHOLD, FUNDING, Env, check_books_and_chain
    tests.support.engine    PROMPT_LEN, NEW_TOKENS, Built, decode_together
    tests.support.fake_hub  FakeHub: a local stand-in for the Hugging Face hub
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azu.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy and return that; fail the test with ``what`` after
    ``timeout`` seconds (never a bare sleep)."""
    return wait_until(cond, timeout=timeout, what=what, interval=interval, error=pytest.fail.Exception)
