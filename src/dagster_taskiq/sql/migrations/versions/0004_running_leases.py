"""Index of the running attempts' leases, for the workers' reaper of expired ones.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'


def upgrade() -> None:
    op.create_index(
        'step_executions_running_lease',
        'step_executions',
        ['lease_expires_at'],
        postgresql_where=sa.text("state = 'RUNNING'"),
    )


def downgrade() -> None:
    op.drop_index('step_executions_running_lease', 'step_executions')
