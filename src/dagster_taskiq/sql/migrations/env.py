"""Alembic environment: migrations run on the connection `store.upgrade` passes in."""

from alembic import context

from dagster_taskiq.sql import VERSION_TABLE

connection = context.config.attributes['connection']
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
