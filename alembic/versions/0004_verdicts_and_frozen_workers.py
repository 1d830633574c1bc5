"""Verified work: withheld accounts, the verifier's verdicts, and frozen workers.

- accounts: a new kind ``withheld`` (one per worker, owner = worker id) holds earnings taken back from a
  worker whose numbers failed verification; both accounts CHECKs are widened for it;
- verdicts: one row per (job, worker) found wrong, with its reason, evidence and the amounts it moved;
- workers.frozen_reason / frozen_at: a frozen worker is paid nothing until an operator clears it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

AMOUNT = sa.Numeric(precision=78, scale=0)

KINDS_BEFORE = "kind IN ('user', 'worker', 'platform', 'chain', 'payouts', 'holds')"
KINDS_AFTER = "kind IN ('user', 'worker', 'platform', 'chain', 'payouts', 'holds', 'withheld')"
OWNED_BEFORE = "(kind IN ('user', 'worker')) = (owner <> '')"
OWNED_AFTER = "(kind IN ('user', 'worker', 'withheld')) = (owner <> '')"


def _replace_account_checks(kinds: str, owned: str) -> None:
    # Dropped and added in this migration's one transaction: no moment without the CHECKs.
    op.drop_constraint(op.f('ck_accounts_kind_known'), 'accounts', type_='check')
    op.drop_constraint(op.f('ck_accounts_owner_matches_kind'), 'accounts', type_='check')
    op.create_check_constraint(op.f('ck_accounts_kind_known'), 'accounts', kinds)
    op.create_check_constraint(op.f('ck_accounts_owner_matches_kind'), 'accounts', owned)


def upgrade() -> None:
    _replace_account_checks(KINDS_AFTER, OWNED_AFTER)
    op.create_table(
        'verdicts',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('job_id', sa.String(length=128), nullable=False),
        sa.Column('worker_id', sa.String(length=128), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('evidence', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('credited', AMOUNT, nullable=False),
        sa.Column('withheld', AMOUNT, nullable=False),
        sa.Column('shortfall', AMOUNT, nullable=False),
        sa.Column('refunded', AMOUNT, nullable=False),
        sa.Column('withhold_transaction_id', sa.BigInteger(), nullable=False),
        sa.Column('refund_transaction_id', sa.BigInteger(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("outcome IN ('failed')", name=op.f('ck_verdicts_outcome_known')),
        sa.CheckConstraint('credited >= 0 AND withheld >= 0 AND shortfall >= 0 AND refunded >= 0',
                           name=op.f('ck_verdicts_amounts_not_negative')),
        sa.CheckConstraint('withheld + shortfall = credited',
                           name=op.f('ck_verdicts_withheld_plus_shortfall_is_credit')),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_verdicts_job_id_jobs')),
        sa.ForeignKeyConstraint(['refund_transaction_id'], ['journal_transactions.id'],
                                name=op.f('fk_verdicts_refund_transaction_id_journal_transactions')),
        sa.ForeignKeyConstraint(['withhold_transaction_id'], ['journal_transactions.id'],
                                name=op.f('fk_verdicts_withhold_transaction_id_journal_transactions')),
        sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_verdicts_worker_id_workers')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_verdicts')),
        sa.UniqueConstraint('job_id', 'worker_id', name='uq_verdicts_job_id_worker_id'),
    )
    op.create_index(op.f('ix_verdicts_worker_id'), 'verdicts', ['worker_id'], unique=False)
    # Nullable columns without a default: catalog-only changes, no table rewrite.
    op.add_column('workers', sa.Column('frozen_reason', sa.Text(), nullable=True))
    op.add_column('workers', sa.Column('frozen_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Refused (the CHECK fails) while withheld accounts exist: their money has to be moved by hand first.
    op.drop_column('workers', 'frozen_at')
    op.drop_column('workers', 'frozen_reason')
    op.drop_index(op.f('ix_verdicts_worker_id'), table_name='verdicts')
    op.drop_table('verdicts')
    _replace_account_checks(KINDS_BEFORE, OWNED_BEFORE)
