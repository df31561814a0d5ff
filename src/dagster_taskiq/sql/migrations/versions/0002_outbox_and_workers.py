"""Transactional outbox of step side effects, and the registry of live workers.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = '0002'
down_revision = '0001'

TIMESTAMP = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    # Written in the transaction that marks the attempt COMPLETED. No unique key, on purpose:
    # `verify` proves each step's effect exists exactly once by counting.
    op.create_table(
        'step_effects',
        sa.Column('id', sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column('idempotency_key', sa.Text, nullable=False),
        sa.Column('run_id', sa.Text, nullable=False),
        sa.Column('step_key', sa.Text, nullable=False),
        sa.Column('name', sa.Text, nullable=False),
        sa.Column('payload', JSONB, nullable=False),
        sa.Column('created_at', TIMESTAMP, nullable=False, server_default=sa.func.now()),
    )
    op.create_index('step_effects_run_id', 'step_effects', ['run_id'])
    op.create_table(
        'workers',
        sa.Column('worker_id', sa.Text, primary_key=True),
        sa.Column('concurrency', sa.Integer, nullable=False),
        sa.Column('running', sa.Integer, nullable=False, server_default='0'),
        sa.Column('started_at', TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column('last_seen_at', TIMESTAMP, nullable=False, server_default=sa.func.now()),
        sa.Column('stopped_at', TIMESTAMP),
    )


def downgrade() -> None:
    op.drop_table('workers')
    op.drop_table('step_effects')
