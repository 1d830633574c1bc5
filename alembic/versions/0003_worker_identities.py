"""Worker identities: a worker id bound to the Ed25519 public key that first enrolled it, and its wallet.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'worker_identities',
        sa.Column('worker_id', sa.String(length=40), nullable=False),
        sa.Column('public_key', sa.String(length=64), nullable=False),
        sa.Column('wallet_address', sa.String(length=128), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('enrolled_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("worker_id ~ '^[a-z0-9][a-z0-9-]{0,39}$'",
                           name=op.f('ck_worker_identities_worker_id_format')),
        sa.CheckConstraint("public_key ~ '^[0-9a-f]{64}$'", name=op.f('ck_worker_identities_public_key_hex')),
        sa.PrimaryKeyConstraint('worker_id', name=op.f('pk_worker_identities')),
    )


def downgrade() -> None:
    op.drop_table('worker_identities')
