"""Migrations on their own fresh database: upgrade from empty (the CLI, reading DATABASE_URL), no drift
between the models and the schema (``alembic check``), downgrade to nothing, upgrade again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from alembic import command
from azu.billing.ledger.db import REPO_ROOT, alembic_config, make_engine, migrate, normalize_url

pytestmark = pytest.mark.postgres

TABLES = {
    "accounts",
    "journal_transactions",
    "journal_entries",
    "deposits",
    "workers",
    "jobs",
    "job_usage",
    "payouts",
    "api_keys",
    "auth_challenges",
    "worker_identities",
    "verdicts",
}


def _alembic_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    alembic = Path(sys.executable).with_name("alembic")
    return subprocess.run(
        [str(alembic), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _tables(url: str) -> set[str]:
    eng = make_engine(url)
    try:
        return set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def _columns(url: str, table: str) -> list[dict]:  # type: ignore[type-arg]
    eng = make_engine(url)
    try:
        return list(inspect(eng).get_columns(table))
    finally:
        eng.dispose()


@pytest.mark.slow  # runs the alembic command in fresh processes, several times
def test_upgrade_check_downgrade_upgrade(empty_database: str) -> None:
    up = _alembic_cli(empty_database, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert _tables(empty_database) >= TABLES

    check = _alembic_cli(empty_database, "check")
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    current = _alembic_cli(empty_database, "current")
    assert current.returncode == 0 and "(head)" in current.stdout, current.stdout + current.stderr

    command.downgrade(alembic_config(empty_database), "-1")  # one step at a time works too
    assert "verdicts" not in _tables(empty_database)
    assert "frozen_reason" not in {c["name"] for c in _columns(empty_database, "workers")}
    command.downgrade(alembic_config(empty_database), "-1")
    assert "worker_identities" not in _tables(empty_database)
    command.downgrade(alembic_config(empty_database), "-1")
    assert "raw_tx" not in {c["name"] for c in _columns(empty_database, "payouts")}

    command.downgrade(alembic_config(empty_database), "base")
    assert _tables(empty_database) <= {"alembic_version"}
    eng = create_engine(normalize_url(empty_database))
    with eng.connect() as conn:
        functions = conn.execute(text("SELECT proname FROM pg_proc WHERE proname LIKE 'ledger_%'")).all()
    eng.dispose()
    assert functions == []

    migrate(empty_database)  # from code, as `azu up` does; a second run is a no-op
    migrate(empty_database)
    assert _tables(empty_database) >= TABLES


def test_check_detects_drift(empty_database: str) -> None:
    """The drift check is not vacuous: a schema that lacks a column the models have is reported."""
    migrate(empty_database)
    eng = create_engine(normalize_url(empty_database))
    with eng.begin() as conn:
        conn.execute(text("ALTER TABLE api_keys DROP COLUMN label"))
    eng.dispose()
    check = _alembic_cli(empty_database, "check")
    assert check.returncode != 0
    assert "label" in check.stdout + check.stderr
