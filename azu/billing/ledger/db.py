"""Engine and session helpers, and ``migrate(url)`` (alembic upgrade head, callable from code)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# alembic/ sits at the repository root, next to alembic.ini (the CLI reads the same scripts).
REPO_ROOT = Path(__file__).resolve().parents[3]
ALEMBIC_DIR = REPO_ROOT / "alembic"


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` mean psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    if not url:
        raise ValueError("DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/azu)")
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    # pre-ping: a gunicorn worker that idled past a PostgreSQL restart must not fail its next request.
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(normalize_url(url), **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: returned rows stay readable after the transaction that produced them.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit when the block ends normally, roll back when it raises."""
    with session_factory(engine)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str | None = None):  # -> alembic.config.Config (imported lazily: CLI-only dependency)
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini")) if (REPO_ROOT / "alembic.ini").exists() else Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.attributes["configure_logger"] = False  # called from code: keep the host's logging setup
    if url:
        # An attribute, not a main option: ConfigParser would read a '%' in a password as interpolation.
        cfg.attributes["database_url"] = normalize_url(url)
    return cfg


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (``alembic upgrade head``)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
