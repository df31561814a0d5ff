"""End-to-end fixtures: a Dagster instance on PostgreSQL, a queue, and real worker subprocesses."""

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import DagsterInstance, execute_job
from psycopg.rows import dict_row

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import QueueUrls, bootstrap_queues
from dagster_taskiq_demo.emulator import MotoServer
from dagster_taskiq_demo.stack import (
    WorkerProcess,
    create_database,
    drop_database,
    spawn_worker,
    wait_started,
    write_dagster_home,
)
from tests.conftest import BASE_DATABASE_URL
from tests.e2e.jobs import FAST_RUN_CONFIG, demo_job

LEASE_S = 3.0  # heartbeats every second; a lost worker's lease expires within 3 s
ABANDON_GRACE_S = 1.0  # and is abandoned a second later
SIGNING_KEY = 'e2e-signing-key'
STEP_START_TIMEOUT_S = 120.0


@pytest.fixture(scope='session')
def e2e_database_url() -> Iterator[str]:
    """A database of its own for Dagster's storage and the idempotency store."""
    name = f'e2e_{uuid.uuid4().hex[:10]}'
    url = create_database(BASE_DATABASE_URL, name)
    store.upgrade(url)
    yield url
    drop_database(BASE_DATABASE_URL, name)


@pytest.fixture(scope='session')
def dagster_home(e2e_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dagster_home(tmp_path_factory.mktemp('dagster_home'), e2e_database_url)


def query(database_url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute(statement, params).fetchall()


@dataclass
class Stack:
    env: dict[str, str]
    database_url: str
    urls: QueueUrls
    tmp_path: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_workers(
        self, count: int, concurrency: int = 2, *extra: str, env: dict[str, str] | None = None
    ) -> list[WorkerProcess]:
        """Start `count` workers at once and wait until each has warmed its step processes."""
        started = [
            spawn_worker(
                f'worker-{len(self.workers) + index}-{uuid.uuid4().hex[:6]}',
                self.tmp_path,
                *('--concurrency', str(concurrency), '--poll-wait', '1', *extra),
                env=env,
            )
            for index in range(count)
        ]
        self.workers.extend(started)
        wait_started(started)
        return started

    def start_worker(self, concurrency: int = 2, *extra: str) -> WorkerProcess:
        return self.start_workers(1, concurrency, *extra)[0]

    def rows(self, statement: str, **params: Any) -> list[dict[str, Any]]:
        return query(self.database_url, statement, **params)

    def executions(self, run_id: str) -> list[dict[str, Any]]:
        return self.rows(
            'SELECT * FROM step_executions WHERE run_id = %(run_id)s ORDER BY step_key, attempt',
            run_id=run_id,
        )

    def log_rows(self, run_id: str) -> list[dict[str, Any]]:
        return self.rows(
            'SELECT * FROM execution_log WHERE run_id = %(run_id)s ORDER BY id', run_id=run_id
        )


@pytest.fixture
def stack(
    moto_server: MotoServer,
    e2e_database_url: str,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    """A fresh queue on the shared moto server and a Dagster instance; workers stop afterwards."""
    env = {
        'DAGSTER_HOME': str(dagster_home),
        'DATABASE_URL': e2e_database_url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': moto_server.url,
        'DAGSTER_TASKIQ_QUEUE_NAME': f'e2e-{uuid.uuid4().hex[:10]}',
        'DAGSTER_TASKIQ_LEASE_S': str(LEASE_S),
        'DAGSTER_TASKIQ_ABANDON_GRACE_S': str(ABANDON_GRACE_S),
        'DAGSTER_TASKIQ_VISIBILITY_TIMEOUT_S': str(int(LEASE_S * 2)),
        'DAGSTER_TASKIQ_SIGNING_KEY': SIGNING_KEY,
        'DAGSTER_TASKIQ_RETRY_BASE_S': '0.1',
        'DAGSTER_TASKIQ_RETRY_MAX_S': '0.5',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    urls = asyncio.run(bootstrap_queues(Settings()))
    stack = Stack(env=env, database_url=e2e_database_url, urls=urls, tmp_path=tmp_path)
    yield stack
    for worker in stack.workers:
        worker.stop()


@pytest.fixture
def instance(stack: Stack) -> Iterator[DagsterInstance]:
    with DagsterInstance.get() as instance:
        yield instance


def run(
    instance: DagsterInstance, job_name: str, config: dict[str, Any] | None = None
) -> tuple[bool, str]:
    """Execute a demo job in this process (the run worker); (success, run_id)."""
    run_config = {**FAST_RUN_CONFIG, **(config or {})}
    with execute_job(demo_job(job_name), instance, run_config=run_config) as result:
        return result.success, result.run_id


def slow_config(seconds: float) -> dict[str, Any]:
    return {'ops': {'sleep_then_return': {'config': {'seconds': seconds}}}}


def attempts(stack: Stack, run_id: str) -> list[tuple[str, int, str]]:
    return [(r['step_key'], r['attempt'], r['state']) for r in stack.executions(run_id)]
