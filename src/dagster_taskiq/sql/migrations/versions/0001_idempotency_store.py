"""Idempotency store: step_executions, execution_log and the fencing-token sequence.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None

TIMESTAMP = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence('lease_token_seq')))
    op.create_table(
        'step_executions',
        sa.Column('idempotency_key', sa.Text, primary_key=True),
        sa.Column('run_id', sa.Text, nullable=False),
        sa.Column('job_name', sa.Text, nullable=False),
        sa.Column('step_key', sa.Text, nullable=False),
        sa.Column('attempt', sa.Integer, nullable=False),
        sa.Column('state', sa.Text, nullable=False),
        sa.Column('owner', sa.Text),
        sa.Column('lease_token', sa.BigInteger),
        sa.Column('lease_expires_at', TIMESTAMP),
        sa.Column('delivery_count', sa.Integer, nullable=False, server_default='0'),
        sa.Column('refused_count', sa.Integer, nullable=False, server_default='0'),
        sa.Column('enqueued_at', TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column('started_at', TIMESTAMP),
        sa.Column('ended_at', TIMESTAMP),
        sa.Column('error', sa.Text),
        sa.CheckConstraint(
            "state IN ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'ABANDONED', 'CANCELLED')",
            name='step_executions_state',
        ),
    )
    op.create_index('step_executions_run_id', 'step_executions', ['run_id'])
    # Append-only: one row per start of an attempt. No unique key on idempotency_key, on purpose:
    # a second row for a key is a duplicate execution that `verify` must be able to see.
    op.create_table(
        'execution_log',
        sa.Column('id', sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column('idempotency_key', sa.Text, nullable=False),
        sa.Column('run_id', sa.Text, nullable=False),
        sa.Column('step_key', sa.Text, nullable=False),
        sa.Column('attempt', sa.Integer, nullable=False),
        sa.Column('worker_id', sa.Text, nullable=False),
        sa.Column('lease_token', sa.BigInteger, nullable=False),
        sa.Column('started_at', TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column('ended_at', TIMESTAMP),
        sa.Column('outcome', sa.Text),
        sa.Column('error', sa.Text),
    )
    op.create_index('execution_log_key', 'execution_log', ['idempotency_key'])
    op.create_index('execution_log_run_id', 'execution_log', ['run_id'])


def downgrade() -> None:
    op.drop_table('execution_log')
    op.drop_table('step_executions')
    op.execute(sa.schema.DropSequence(sa.Sequence('lease_token_seq')))
