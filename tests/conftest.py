"""Shared fixtures: a real moto server over HTTP and a private PostgreSQL schema per test."""

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.store import Store
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, MotoServer, start_moto

# Tests reach AWS only through the emulator; never through credentials or a profile on the machine.
for name, value in {**EMULATOR_CREDENTIALS, 'AWS_DEFAULT_REGION': 'us-east-1'}.items():
    os.environ[name] = value
for name in (
    'AWS_PROFILE',
    'AWS_ENDPOINT_URL',
    'AWS_ENDPOINT_URL_SQS',
    'DAGSTER_TASKIQ_SIGNING_KEY',
):
    os.environ.pop(name, None)

BASE_DATABASE_URL = os.environ.get(
    'DAGSTER_TASKIQ_TEST_DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/test'
)


@pytest.fixture(scope='session')
def moto_server() -> Iterator[MotoServer]:
    server = start_moto()
    yield server
    server.stop()


def libpq_dsn(url: str) -> str:
    return (
        make_url(url).set(drivername='postgresql', query={}).render_as_string(hide_password=False)
    )


@pytest.fixture
def database_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own, dropped after the test."""
    schema = f'test_{uuid.uuid4().hex[:12]}'
    dsn = libpq_dsn(BASE_DATABASE_URL)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL('CREATE SCHEMA {}').format(sql.Identifier(schema)))
    yield str(make_url(BASE_DATABASE_URL).update_query_dict({'options': f'-csearch_path={schema}'}))
    with psycopg.connect(dsn, autocommit=True) as connection:
        _drop_schema(connection, schema)


def _drop_schema(connection: psycopg.Connection, schema: str) -> None:
    """Drop `schema`; a connection the test left holding its locks is ended and reported."""
    drop = sql.SQL('DROP SCHEMA {} CASCADE').format(sql.Identifier(schema))
    connection.execute("SET lock_timeout = '5s'")
    try:
        connection.execute(drop)
        return
    except psycopg.errors.LockNotAvailable:
        holders = connection.execute(LOCK_HOLDERS, {'schema': schema}).fetchall()
        connection.execute(
            'SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid',
            [[pid for pid, _, _ in holders]],
        )
        connection.execute("SET lock_timeout = '30s'")
        connection.execute(drop)
    pytest.fail(f'the test left connections holding locks in its schema: {holders}')


LOCK_HOLDERS = """
SELECT DISTINCT a.pid, a.state, a.query FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE n.nspname = %(schema)s AND l.granted AND a.pid <> pg_backend_pid()
"""


def migrate(database_url: str) -> None:
    """The store's migrations and Dagster's event log and run tables (the store writes terminal
    events to one and reads run statuses in the other), as in Dagster's own database."""
    from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
    from dagster._core.storage.runs.schema import RunStorageSqlMetadata

    store.upgrade(database_url)
    engine = store.sync_engine(database_url)
    try:
        SqlEventLogStorageMetadata.create_all(engine)
        RunStorageSqlMetadata.create_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Store]:
    """The store on a migrated private schema; it abandons an expired lease at once (no grace)."""
    migrate(database_url)
    db = Store.connect(database_url, abandon_grace_s=0.0)
    yield db
    await db.close()


@pytest.fixture
def settings(moto_server: MotoServer) -> Settings:
    """Settings for a fresh queue pair on the shared moto server, with short backoffs."""
    return Settings(
        aws_endpoint_url=moto_server.url,
        queue_name=f'steps-{uuid.uuid4().hex[:10]}',
        retry_base_s=0.05,
        retry_max_s=0.2,
    )
