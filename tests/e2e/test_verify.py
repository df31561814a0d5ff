"""`verify` finds each way exactly-once can break: real runs leave a clean record, then each
failure class is planted in a copy of it (the tables a real breakage would have left), and verify
must report it and exit 1."""

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import DagsterInstance, execute_job
from psycopg import sql

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues
from dagster_taskiq_demo.emulator import MotoServer
from dagster_taskiq_demo.stack import (
    create_database,
    drop_database,
    spawn_worker,
    wait_started,
    write_dagster_home,
)
from tests.conftest import BASE_DATABASE_URL
from tests.e2e.conftest import SIGNING_KEY
from tests.e2e.jobs import FAST_RUN_CONFIG, demo_job

pytestmark = pytest.mark.timeout(300)
JOBS: list[tuple[str, dict[str, Any]]] = [
    ('fast_job', {}),
    ('side_effect_job', {}),
    ('recorded_job', {'ops': {'recorded_sleep': {'config': {'seconds': 0.5}}}}),
    ('flaky_job', {}),
]


@pytest.fixture(scope='module')
def recorded(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database (to copy as a template) holding what real runs of `JOBS` on two real workers
    left: Dagster's storage, the store, the effects and the demo ops' own rows."""
    name = f'verify_{uuid.uuid4().hex[:10]}'
    url = create_database(BASE_DATABASE_URL, name)
    store.upgrade(url)
    folder = tmp_path_factory.mktemp('verify')
    env = {
        'DAGSTER_HOME': str(write_dagster_home(folder / 'home', url)),
        'DATABASE_URL': url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': moto_server.url,
        'DAGSTER_TASKIQ_QUEUE_NAME': f'verify-{uuid.uuid4().hex[:10]}',
        'DAGSTER_TASKIQ_SIGNING_KEY': SIGNING_KEY,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        asyncio.run(bootstrap_queues(Settings()))
        workers = [spawn_worker(f'verify-worker-{i}', folder, '--poll-wait', '1') for i in (0, 1)]
        try:
            wait_started(workers)
            with DagsterInstance.get() as instance:
                for job_name, config in JOBS:
                    run_config = {**FAST_RUN_CONFIG, **config}
                    with execute_job(demo_job(job_name), instance, run_config=run_config) as result:
                        assert result.success, job_name
        finally:
            for worker in workers:
                worker.stop()
    yield name
    drop_database(BASE_DATABASE_URL, name)


@pytest.fixture
def copy(recorded: str) -> Iterator[str]:
    """A copy of the recorded database, for one test to plant a failure in."""
    name = f'{recorded}_{uuid.uuid4().hex[:6]}'
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as connection:
        connection.execute(
            'SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s', (recorded,)
        )
        connection.execute(
            sql.SQL('CREATE DATABASE {} TEMPLATE {}').format(
                sql.Identifier(name), sql.Identifier(recorded)
            )
        )
    yield create_url(name)
    drop_database(BASE_DATABASE_URL, name)


def create_url(name: str) -> str:
    return BASE_DATABASE_URL.rsplit('/', 1)[0] + f'/{name}'


def run_verify(database_url: str, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The verify command as a user runs it, writing its report to `output`."""
    return subprocess.run(
        [
            sys.executable,
            *('-m', 'dagster_taskiq_demo.load_simulator.cli', 'verify', '--output', str(output)),
            *('--data-dir', str(output.parent / 'no-stack'), *args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'},
    )


def verify(database_url: str, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """verify's exit status and its JSON report."""
    output = tmp_path / 'report.json'
    done = run_verify(database_url, output, *args)
    assert output.exists(), done.stdout + done.stderr
    return done.returncode, json.loads(output.read_text())


def plant(database_url: str, *statements: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as connection:
        for statement in statements:
            assert connection.execute(statement).rowcount >= 1, statement


@pytest.mark.slow
def test_the_record_of_real_runs_verifies_clean(copy: str, tmp_path: Path) -> None:
    status, report = verify(copy, tmp_path)
    assert status == 0, report['findings']
    assert report['verified'] is True
    assert report['runs_by_status'] == {'SUCCESS': len(JOBS)}
    assert report['counts']['attempts_retried'] == 1  # flaky_job's second attempt
    assert set(report['failures'].values()) == {0}
    assert (tmp_path / 'report.png').read_bytes().startswith(b'\x89PNG')  # the chart, beside it
    page = (tmp_path / 'report.html').read_text()
    assert '<svg' in page and 'VERIFIED' in page


PLANTED = {
    'a second start of one attempt': (
        'duplicate_executions',
        [
            'INSERT INTO execution_log (idempotency_key, run_id, step_key, attempt, worker_id,'
            ' lease_token, started_at, ended_at, outcome) SELECT idempotency_key, run_id,'
            " step_key, attempt, 'another-worker', lease_token + 1, started_at, ended_at, outcome"
            " FROM execution_log WHERE step_key = 'ping'",
        ],
    ),
    'two attempts of one step completed': (
        'duplicate_executions',
        [
            'INSERT INTO step_executions (idempotency_key, run_id, job_name, step_key, attempt,'
            " state) SELECT run_id || ':ping:1', run_id, job_name, step_key, 1, 'COMPLETED'"
            " FROM step_executions WHERE step_key = 'ping'",
        ],
    ),
    'two attempts whose user code overlapped': (
        'overlapping_attempts',
        [
            'INSERT INTO demo_op_runs (run_id, step_key, attempt, pid, begun_at, alive_at,'
            " ended_at, worker) SELECT run_id, step_key, 1, 1, begun_at + interval '0.1 s',"
            " ended_at, ended_at + interval '1 s', 'another-worker' FROM demo_op_runs"
            " WHERE step_key = 'recorded_sleep'",
        ],
    ),
    'a success the store does not have': (
        'disagreements',
        ["UPDATE step_executions SET state = 'FAILED' WHERE step_key = 'add_one_2'"],
    ),
    'a success Dagster does not have': (
        'disagreements',
        ["DELETE FROM event_logs WHERE dagster_event_type = 'STEP_SUCCESS' AND step_key = 'ping'"],
    ),
    'a missing effect': (
        'effect_problems',
        ["DELETE FROM step_effects WHERE step_key = 'effect_b'"],
    ),
    'a duplicated effect': (
        'effect_problems',
        [
            'INSERT INTO step_effects (idempotency_key, run_id, step_key, name, payload)'
            ' SELECT idempotency_key, run_id, step_key, name, payload FROM step_effects'
            " WHERE step_key = 'effect_c'",
        ],
    ),
    'a step of a successful run with no completed attempt': (
        'lost_steps',
        ["DELETE FROM step_executions WHERE step_key = 'effect_a'"],
    ),
    'an attempt running past its lease': (
        'stranded',
        [
            "UPDATE step_executions SET state = 'RUNNING', lease_expires_at = now() -"
            " interval '1 hour' WHERE step_key = 'add_one'",
        ],
    ),
    'a run left started with nothing queued or running': (
        'stranded',
        [
            "UPDATE runs SET status = 'STARTED', update_timestamp = update_timestamp -"
            " interval '1 hour' WHERE pipeline_name = 'fast_job'",
            "UPDATE event_logs SET timestamp = timestamp - interval '1 hour' WHERE run_id IN"
            " (SELECT run_id FROM runs WHERE pipeline_name = 'fast_job')",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize('planted', list(PLANTED))
def test_each_planted_failure_is_reported_and_fails_the_verification(
    planted: str, copy: str, tmp_path: Path
) -> None:
    failure_class, statements = PLANTED[planted]
    plant(copy, *statements)
    status, report = verify(copy, tmp_path, '--settle', '5')
    assert status == 1
    assert report['verified'] is False
    assert report['failures'][failure_class] >= 1, report['findings']


@pytest.mark.slow
def test_the_csv_report_has_every_figure_and_finding(copy: str, tmp_path: Path) -> None:
    plant(copy, "DELETE FROM step_effects WHERE step_key = 'effect_b'")
    output = tmp_path / 'report.csv'
    done = run_verify(copy, output, '--format', 'csv')
    assert done.returncode == 1
    lines = output.read_text().splitlines()
    assert lines[0] == 'section,name,value'
    assert 'summary,verified,False' in lines
    assert 'failures,effect_problems,1' in lines
    assert any(line.startswith('effect_problems,') and 'missing effect' in line for line in lines)
