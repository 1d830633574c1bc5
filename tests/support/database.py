"""The real PostgreSQL server of the ledger and payout tests: throwaway databases and the ledger's tables.

The server is the one at 127.0.0.1:5432; ``AZU_TEST_PG_URL`` overrides the admin URL.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, make_url, text

ADMIN_URL = os.environ.get("AZU_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Every table the ledger's migrations create, in an order TRUNCATE ... CASCADE accepts.
LEDGER_TABLES = ("journal_entries, deposits, job_usage, payouts, journal_transactions, jobs, workers, "
                 "accounts, api_keys, auth_challenges, worker_identities, verdicts")

# One row: the sum of all balances, and how many accounts drift from their entries, journal transactions do
# not balance, and accounts other than the chain's are below zero.
BOOKS_CHECK = """
SELECT
  (SELECT coalesce(sum(balance), 0) FROM accounts) AS total,
  (SELECT count(*) FROM accounts a
     WHERE a.balance <> (SELECT coalesce(sum(e.amount), 0) FROM journal_entries e WHERE e.account_id = a.id))
     AS drifted,
  (SELECT count(*) FROM (SELECT transaction_id FROM journal_entries GROUP BY transaction_id
                         HAVING sum(amount) <> 0) t) AS unbalanced,
  (SELECT count(*) FROM accounts WHERE balance < 0 AND kind <> 'chain') AS negative
"""


def _admin() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


def create_database(prefix: str = "azu_test") -> str:
    """Create an empty database with a random name; return its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin.url.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop the database at ``url``, closing whatever connections it still has."""
    name = make_url(url).database
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def migrated_engine(prefix: str) -> Iterator[Engine]:
    """A fresh database brought to the ledger's newest schema, its engine, and the database dropped after."""
    from azu.billing.ledger.db import make_engine, migrate

    url = create_database(prefix)
    eng = make_engine(url, pool_size=5, max_overflow=5)
    try:
        migrate(url)
        yield eng
    finally:
        eng.dispose()
        drop_database(url)
