"""Ledger fixtures: one fresh PostgreSQL database per test run, migrated with ``alembic upgrade head``.

The server is the real one at 127.0.0.1:5432 (``AZU_TEST_PG_URL`` overrides the admin URL). Tests commit for
real (the concurrency tests need separate sessions), so after every test the books are checked (every
journal transaction balances, every balance equals its entries, all accounts sum to zero) and the tables are
emptied for the next test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from azu.billing.ledger.db import make_engine, migrate, session_scope
from tests.support.database import BOOKS_CHECK, LEDGER_TABLES, create_database, drop_database


@pytest.fixture
def empty_database() -> Iterator[str]:
    """Another fresh, empty (unmigrated) database for this test only."""
    url = create_database("azu_test_empty")
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = create_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    # Room for the 50-thread tests without taking a large share of the server's 100 connections.
    eng = make_engine(database_url, pool_size=20, max_overflow=5, pool_timeout=60)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session whose work the test commits explicitly (or through service calls + commit)."""
    with Session(engine, expire_on_commit=False) as s:
        yield s
        s.rollback()


@pytest.fixture(autouse=True)
def books_balance(engine: Engine) -> Iterator[None]:
    """After every test: all accounts sum to zero and each balance equals its entries. Then a clean slate."""
    yield
    with session_scope(engine) as s:
        row = s.execute(text(BOOKS_CHECK)).one()
    assert row.total == 0, f"accounts sum to {row.total}, not 0"
    assert row.drifted == 0, f"{row.drifted} account balance(s) differ from their entries"
    assert row.unbalanced == 0, f"{row.unbalanced} journal transaction(s) do not balance"
    assert row.negative == 0, f"{row.negative} account(s) below zero"
    with session_scope(engine) as s:
        s.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
