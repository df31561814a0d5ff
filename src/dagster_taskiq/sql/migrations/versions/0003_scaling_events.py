"""Every auto-scaler decision, for reports and verify's scaling timeline.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'


def upgrade() -> None:
    op.create_table(
        'scaling_events',
        sa.Column('id', sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column('at', sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('cluster', sa.Text, nullable=False),
        sa.Column('service', sa.Text, nullable=False),
        sa.Column('visible', sa.Integer, nullable=False),
        sa.Column('in_flight', sa.Integer, nullable=False),
        sa.Column('delayed', sa.Integer, nullable=False),
        sa.Column('running', sa.Integer, nullable=False),
        sa.Column('desired_before', sa.Integer, nullable=False),
        sa.Column('recommendation', sa.Integer, nullable=False),
        sa.Column('desired', sa.Integer, nullable=False),
        sa.Column('reason', sa.Text, nullable=False),
    )
    op.create_index('scaling_events_at', 'scaling_events', ['service', 'at'])


def downgrade() -> None:
    op.drop_table('scaling_events')
