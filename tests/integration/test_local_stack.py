"""Pieces of the local stack that a whole `up` (tests/e2e/test_local_stack.py) cannot reach."""

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dagster_taskiq_demo.local_stack import LocalStack, StackOptions, group_alive


@pytest.fixture
def folder() -> Iterator[Path]:
    """A data folder the `postgres` user can reach (pytest's own tmp folders are private)."""
    with tempfile.TemporaryDirectory(prefix='stack-') as name:
        Path(name).chmod(0o755)
        yield Path(name)


def private_postgres(folder: Path) -> LocalStack:
    stack = LocalStack(StackOptions(data_dir=folder, database_url=None), threading.Event())
    stack.start_private_postgres()
    return stack


def test_a_private_postgres_keeps_its_data_between_starts_and_stops_with_the_stack(
    folder: Path,
) -> None:
    stack = private_postgres(folder)
    server_url = stack.database_url.rsplit('/', 1)[0] + '/postgres'
    try:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute('CREATE TABLE kept (value int)')
            connection.execute('INSERT INTO kept VALUES (42)')
    finally:
        stack.stop()
    [server] = stack.components
    assert server.pid is not None and not group_alive(server.pid)
    again = private_postgres(folder)
    try:
        assert again.database_url == stack.database_url  # same port: same URL
        with psycopg.connect(server_url) as connection:
            assert connection.execute('SELECT value FROM kept').fetchall() == [(42,)]
    finally:
        again.stop()
