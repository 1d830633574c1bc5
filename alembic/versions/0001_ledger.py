"""The ledger: accounts, balanced journal, deposits, jobs, payouts, API keys, auth challenges.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 01:08:15.875486
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

AMOUNT = sa.Numeric(precision=78, scale=0)  # base units (wei, lamports); any uint256 fits

# env.py runs each migration in its own transaction with lock_timeout = 4s: a migration that would wait
# longer on a busy table fails fast instead of stalling the API behind its lock. Raise it here if needed:
#     op.execute("SET LOCAL lock_timeout = '30s'")


# The database keeps the books honest by itself (see azu/billing/ledger/models.py for the scheme):
# 1. each journal entry moves its account's balance in the same transaction (the accounts CHECK then refuses
#    a negative balance, except for the outside-chain account);
# 2. balances change only that way: any other UPDATE of accounts.balance, or a new account with a balance,
#    is refused (pg_trigger_depth() is 2 only inside trigger 1);
# 3. entries are append-only;
# 4. at COMMIT, every journal transaction that got entries must sum to zero.
TRIGGERS_UP = [
    """
    CREATE FUNCTION ledger_apply_entry() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER journal_entries_apply AFTER INSERT ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_apply_entry()
    """,
    """
    CREATE FUNCTION ledger_guard_balance() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' AND NEW.balance <> 0 THEN
            RAISE EXCEPTION 'account % must start at balance 0; money arrives only as journal entries',
                NEW.kind USING ERRCODE = 'check_violation';
        END IF;
        IF TG_OP = 'UPDATE' AND NEW.balance IS DISTINCT FROM OLD.balance AND pg_trigger_depth() < 2 THEN
            RAISE EXCEPTION 'accounts.balance changes only through journal_entries (account %)', OLD.id
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER accounts_guard_balance BEFORE INSERT OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_guard_balance()
    """,
    """
    CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'journal entries are append-only; post a correcting transaction instead'
            USING ERRCODE = 'check_violation';
    END $$
    """,
    """
    CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()
    """,
    """
    CREATE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        total numeric;
    BEGIN
        SELECT sum(amount) INTO total FROM journal_entries WHERE transaction_id = NEW.transaction_id;
        IF total <> 0 THEN
            RAISE EXCEPTION 'journal transaction % does not balance (sum of entries %)',
                NEW.transaction_id, total USING ERRCODE = 'check_violation';
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE CONSTRAINT TRIGGER journal_entries_balanced AFTER INSERT ON journal_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_check_balanced()
    """,
]

TRIGGERS_DOWN = [
    "DROP TRIGGER IF EXISTS journal_entries_balanced ON journal_entries",
    "DROP FUNCTION IF EXISTS ledger_check_balanced()",
    "DROP TRIGGER IF EXISTS journal_entries_append_only ON journal_entries",
    "DROP FUNCTION IF EXISTS ledger_entries_append_only()",
    "DROP TRIGGER IF EXISTS accounts_guard_balance ON accounts",
    "DROP FUNCTION IF EXISTS ledger_guard_balance()",
    "DROP TRIGGER IF EXISTS journal_entries_apply ON journal_entries",
    "DROP FUNCTION IF EXISTS ledger_apply_entry()",
]


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=128), server_default='', nullable=False),
    sa.Column('balance', AMOUNT, server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(kind IN ('user', 'worker')) = (owner <> '')", name=op.f('ck_accounts_owner_matches_kind')),
    sa.CheckConstraint("balance >= 0 OR kind = 'chain'", name=op.f('ck_accounts_balance_not_negative')),
    sa.CheckConstraint("kind IN ('user', 'worker', 'platform', 'chain', 'payouts', 'holds')", name=op.f('ck_accounts_kind_known')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('kind', 'owner', name='uq_accounts_kind_owner')
    )
    op.create_table('api_keys',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('address', sa.String(length=128), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('char_length(key_hash) = 64', name=op.f('ck_api_keys_key_hash_is_sha256_hex')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_index(op.f('ix_api_keys_address'), 'api_keys', ['address'], unique=False)
    op.create_table('auth_challenges',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('address', sa.String(length=128), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_challenges')),
    sa.UniqueConstraint('nonce', name=op.f('uq_auth_challenges_nonce'))
    )
    op.create_index(op.f('ix_auth_challenges_address'), 'auth_challenges', ['address'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('user_address', sa.String(length=128), nullable=False),
    sa.Column('model_id', sa.String(length=256), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='held', nullable=False),
    sa.Column('hold_amount', AMOUNT, nullable=False),
    sa.Column('price', AMOUNT, nullable=False),
    sa.Column('charged', AMOUNT, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('held', 'settled', 'released')", name=op.f('ck_jobs_status_known')),
    sa.CheckConstraint('charged IS NULL OR (charged >= 0 AND charged <= hold_amount)', name=op.f('ck_jobs_charged_within_hold')),
    sa.CheckConstraint('hold_amount >= 0', name=op.f('ck_jobs_hold_not_negative')),
    sa.CheckConstraint('price >= 0', name=op.f('ck_jobs_price_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_user_address'), 'jobs', ['user_address'], unique=False)
    op.create_table('journal_transactions',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('memo', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_journal_transactions')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_journal_transactions_idempotency_key'))
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('wallet_address', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('deposits',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('tx_id', sa.String(length=128), nullable=False),
    sa.Column('sender', sa.String(length=128), nullable=False),
    sa.Column('amount', AMOUNT, nullable=False),
    sa.Column('account_id', sa.BigInteger(), nullable=False),
    sa.Column('journal_transaction_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('amount > 0', name=op.f('ck_deposits_amount_positive')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_deposits_account_id_accounts')),
    sa.ForeignKeyConstraint(['journal_transaction_id'], ['journal_transactions.id'], name=op.f('fk_deposits_journal_transaction_id_journal_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deposits')),
    sa.UniqueConstraint('tx_id', name=op.f('uq_deposits_tx_id'))
    )
    op.create_index(op.f('ix_deposits_sender'), 'deposits', ['sender'], unique=False)
    op.create_table('job_usage',
    sa.Column('job_id', sa.String(length=128), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('token_layers', sa.BigInteger(), nullable=False),
    sa.Column('credited', AMOUNT, nullable=False),
    sa.CheckConstraint('credited >= 0', name=op.f('ck_job_usage_credited_not_negative')),
    sa.CheckConstraint('token_layers >= 0', name=op.f('ck_job_usage_token_layers_not_negative')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_usage_job_id_jobs')),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_job_usage_worker_id_workers')),
    sa.PrimaryKeyConstraint('job_id', 'worker_id', name=op.f('pk_job_usage'))
    )
    op.create_table('journal_entries',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=False),
    sa.Column('account_id', sa.BigInteger(), nullable=False),
    sa.Column('amount', AMOUNT, nullable=False),
    sa.CheckConstraint('amount <> 0', name=op.f('ck_journal_entries_amount_not_zero')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_journal_entries_account_id_accounts')),
    sa.ForeignKeyConstraint(['transaction_id'], ['journal_transactions.id'], name=op.f('fk_journal_entries_transaction_id_journal_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_journal_entries'))
    )
    op.create_index(op.f('ix_journal_entries_account_id'), 'journal_entries', ['account_id'], unique=False)
    op.create_index(op.f('ix_journal_entries_transaction_id'), 'journal_entries', ['transaction_id'], unique=False)
    op.create_table('payouts',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('amount', AMOUNT, nullable=False),
    sa.Column('to_address', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
    sa.Column('tx_id', sa.String(length=128), nullable=True),
    sa.Column('nonce', sa.BigInteger(), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'reversed', 'failed') OR tx_id IS NOT NULL", name=op.f('ck_payouts_sent_has_tx')),
    sa.CheckConstraint("status IN ('pending', 'sent', 'confirmed', 'failed', 'reversed')", name=op.f('ck_payouts_status_known')),
    sa.CheckConstraint('amount > 0', name=op.f('ck_payouts_amount_positive')),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_payouts_worker_id_workers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payouts')),
    sa.UniqueConstraint('tx_id', name=op.f('uq_payouts_tx_id'))
    )
    op.create_index(op.f('ix_payouts_worker_id'), 'payouts', ['worker_id'], unique=False)
    op.create_index('uq_payouts_live_nonce', 'payouts', ['nonce'], unique=True, postgresql_where=sa.text("nonce IS NOT NULL AND status <> 'reversed'"))
    op.create_index('uq_payouts_one_open_per_worker', 'payouts', ['worker_id'], unique=True, postgresql_where=sa.text("status IN ('pending', 'sent')"))
    for statement in TRIGGERS_UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in TRIGGERS_DOWN:
        op.execute(statement)
    op.drop_index('uq_payouts_one_open_per_worker', table_name='payouts', postgresql_where=sa.text("status IN ('pending', 'sent')"))
    op.drop_index('uq_payouts_live_nonce', table_name='payouts', postgresql_where=sa.text("nonce IS NOT NULL AND status <> 'reversed'"))
    op.drop_index(op.f('ix_payouts_worker_id'), table_name='payouts')
    op.drop_table('payouts')
    op.drop_index(op.f('ix_journal_entries_transaction_id'), table_name='journal_entries')
    op.drop_index(op.f('ix_journal_entries_account_id'), table_name='journal_entries')
    op.drop_table('journal_entries')
    op.drop_table('job_usage')
    op.drop_index(op.f('ix_deposits_sender'), table_name='deposits')
    op.drop_table('deposits')
    op.drop_table('workers')
    op.drop_table('journal_transactions')
    op.drop_index(op.f('ix_jobs_user_address'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_auth_challenges_address'), table_name='auth_challenges')
    op.drop_table('auth_challenges')
    op.drop_index(op.f('ix_api_keys_address'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('accounts')
