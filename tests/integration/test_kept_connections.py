"""The storage connections a run worker and a step process keep: a reset one is replaced when it
had been idle, as the run worker's every checkout and a step process's after its op ran."""

import psycopg
import pytest
import sqlalchemy
import sqlalchemy.exc

from dagster_taskiq.step_process import _ping_idle_connections
from tests.conftest import libpq_dsn


def kept_engine(database_url: str, ping_idle_s: float) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine(
        sqlalchemy.make_url(database_url).set(drivername='postgresql+psycopg2'), pool_size=1
    )
    _ping_idle_connections(engine.pool, ping_idle_s)
    return engine


def backend_pid(engine: sqlalchemy.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sqlalchemy.text('SELECT pg_backend_pid()')).scalar_one())


def reset(database_url: str, pid: int) -> None:
    with psycopg.connect(libpq_dsn(database_url), autocommit=True) as admin:
        admin.execute('SELECT pg_terminate_backend(%s)', (pid,))


def test_a_connection_reset_while_idle_is_replaced_before_it_is_used(database_url: str) -> None:
    engine = kept_engine(database_url, ping_idle_s=0.0)
    try:
        pid = backend_pid(engine)
        reset(database_url, pid)
        assert backend_pid(engine) != pid  # no error: the ping found it dead
    finally:
        engine.dispose()


def test_a_connection_used_just_now_is_not_pinged(database_url: str) -> None:
    """Within `ping_idle_s` of its last use (a step's event writes, a few ms apart) no ping: a
    reset is met by the statement, and the pool replaces the connection after it."""
    engine = kept_engine(database_url, ping_idle_s=3600.0)
    try:
        pid = backend_pid(engine)
        reset(database_url, pid)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            backend_pid(engine)
        assert backend_pid(engine) != pid
    finally:
        engine.dispose()
