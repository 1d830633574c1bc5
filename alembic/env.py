"""Alembic environment for the ledger.

The URL comes from ``config.attributes["database_url"]`` (azu.billing.ledger.db.migrate) or ``DATABASE_URL``.
Each migration runs in its own transaction, under a 4 s lock timeout (fail fast rather than queue the live
API behind an ACCESS EXCLUSIVE lock), and the whole run holds a PostgreSQL advisory lock so two deploys
starting at once migrate one after the other.
"""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import create_engine, pool, text

from alembic import context
from azu.billing.ledger.db import normalize_url
from azu.billing.ledger.models import Amount, Base
from azu.config import get_settings
from azu.network import identity  # noqa: F401  (its worker_identities table is in Base.metadata)

config = context.config
# The CLI configures logging from alembic.ini; azu.billing.ledger.db.migrate() leaves the host app's
# logging alone.
if config.config_file_name and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata

# Any constant works; it only has to be the same for every process migrating this database.
MIGRATION_LOCK_ID = 0x617A755F6C6564  # "azu_led"
LOCK_TIMEOUT = "4s"
STATEMENT_TIMEOUT = "60s"


def _render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    # Migrations must not import app code (they are frozen history): render Amount as its plain column type.
    if type_ == "type" and isinstance(obj, Amount):
        return "sa.Numeric(precision=78, scale=0)"
    return False


def _url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url or ""
    return normalize_url(url)


# What both modes configure alike.
_COMMON = dict(
    target_metadata=target_metadata,
    transaction_per_migration=True,
    compare_type=True,
    render_item=_render_item,
)


def run_migrations_offline() -> None:
    context.configure(url=_url(), literal_binds=True, **_COMMON)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Session-level settings and lock, committed before Alembic starts its own per-migration
        # transactions (Alembic leaves an already-open transaction to the caller).
        # The advisory lock first: lock_timeout also bounds advisory-lock waits, and a second deploy
        # must wait for the first one's migrations, not give up after LOCK_TIMEOUT.
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
        connection.execute(text(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
        connection.commit()
        try:
            context.configure(connection=connection, **_COMMON)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
