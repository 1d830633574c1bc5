"""Keep a payout's signed transaction bytes, so a resend after a restart sends the very same transaction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 01:14:14.975867
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# env.py runs each migration in its own transaction with lock_timeout = 4s: a migration that would wait
# longer on a busy table fails fast instead of stalling the API behind its lock. Raise it here if needed:
#     op.execute("SET LOCAL lock_timeout = '30s'")


def upgrade() -> None:
    # A nullable column without a default: a catalog-only change, no table rewrite.
    op.add_column('payouts', sa.Column('raw_tx', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column('payouts', 'raw_tx')
