"""The command lines as a new user meets them: bad options and broken set-ups get one clear line."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues
from dagster_taskiq_demo.emulator import free_port
from tests.conftest import migrate

BIN = Path(sys.executable).parent
UNREACHABLE_DATABASE = 'postgresql://postgres@127.0.0.1:1/test'


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / 'dagster-taskiq'), *args]
    environment = {**os.environ, 'DAGSTER_TASKIQ_RETRY_ATTEMPTS': '1', **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


@pytest.fixture(autouse=True)
def worker_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signing key and a Dagster home, which every worker needs to start (tests of their
    absence remove them)."""
    home = tmp_path / 'dagster_home'
    home.mkdir()
    (home / 'dagster.yaml').write_text('telemetry:\n  enabled: false\n')
    monkeypatch.setenv('DAGSTER_HOME', str(home))
    monkeypatch.setenv('DAGSTER_TASKIQ_SIGNING_KEY', 'cli-test-key')


def test_a_worker_without_a_signing_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('DAGSTER_TASKIQ_SIGNING_KEY')
    error = one_line_error(cli('worker', env={'DATABASE_URL': UNREACHABLE_DATABASE}))
    assert 'no signing key: set DAGSTER_TASKIQ_SIGNING_KEY' in error
    assert '--allow-unsigned' in error
    allowed = cli('worker', '--allow-unsigned', env={'DATABASE_URL': UNREACHABLE_DATABASE})
    assert 'database unreachable' in one_line_error(allowed)  # past the key, to the next check


def test_a_worker_without_a_dagster_home_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('DAGSTER_HOME')
    error = one_line_error(cli('worker'))
    assert 'DAGSTER_HOME is not set: a worker runs steps only against its own Dagster instance' in (
        error
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error a start-up failure printed: one line, last, exit code 1, no traceback.

    Log lines may come before it (a retried call logs each failed try).
    """
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith('error: ')] == lines[-1:], result.stderr
    return lines[-1]


async def ready_env(settings: Settings, database_url: str) -> dict[str, str]:
    """Variables for a worker that can start: a migrated store and an existing queue."""
    migrate(database_url)
    await bootstrap_queues(settings)
    return {
        'DATABASE_URL': database_url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': str(settings.aws_endpoint_url),
        'DAGSTER_TASKIQ_QUEUE_NAME': settings.queue_name,
    }


@pytest.mark.parametrize(
    ('args', 'named'),
    [
        (['worker', '--concurrency', '0'], '--concurrency'),
        (['worker', '--poll-wait', '-1'], '--poll-wait'),
        (['worker', '--poll-wait', '21'], '--poll-wait'),
        (['worker', '--drain-timeout', '-1'], '--drain-timeout'),
        (['worker', '--metrics-port', '0'], '--metrics-port'),
        (['autoscaler', '--poll-interval', '-1'], '--poll-interval'),
        (['autoscaler', '--poll-interval', '0'], '--poll-interval'),
        (['autoscaler', '--min-workers', '3', '--max-workers', '2'], '--min-workers'),
    ],
)
def test_bad_options_are_refused_before_anything_starts(args: list[str], named: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert named in result.stderr


def test_an_option_reads_its_environment_variable() -> None:
    result = cli('worker', env={'DAGSTER_TASKIQ_CONCURRENCY': '0'})
    assert result.returncode == 2
    assert '--concurrency' in result.stderr


def test_help_and_version_do_not_import_dagster() -> None:
    probe = subprocess.run(
        [sys.executable, '-c', 'import sys, dagster_taskiq.cli; print("dagster" in sys.modules)'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == 'False'
    assert cli('--version').stdout.startswith('dagster-taskiq, version ')
    assert 'worker' in cli('--help').stdout


@pytest.mark.parametrize(
    ('env', 'expected'),
    [
        ({'DATABASE_URL': UNREACHABLE_DATABASE}, 'database unreachable'),
        ({'DATABASE_URL': 'mysql://root@127.0.0.1/test'}, 'must be PostgreSQL'),
        ({'DAGSTER_TASKIQ_LEASE_S': 'soon'}, 'invalid settings: DAGSTER_TASKIQ_LEASE_S'),
        ({'DAGSTER_TASKIQ_LEASE_S': '-1'}, 'invalid settings: DAGSTER_TASKIQ_LEASE_S'),
        ({'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': '127.0.0.1:4566'}, 'needs a scheme'),
    ],
)
def test_a_broken_set_up_is_one_line_naming_it(env: dict[str, str], expected: str) -> None:
    assert expected in one_line_error(cli('worker', env=env))


def test_a_database_without_the_store_says_to_upgrade(database_url: str) -> None:
    error = one_line_error(cli('worker', env={'DATABASE_URL': database_url}))
    assert 'dagster-taskiq db upgrade' in error


def test_a_store_outside_dagsters_database_is_refused(database_url: str) -> None:
    store.upgrade(database_url)  # the store's tables, but no Dagster storage in this database
    error = one_line_error(cli('worker', env={'DATABASE_URL': database_url}))
    assert "Dagster's storage (table event_logs, runs) is not in the store's database" in error


def test_db_upgrade_says_what_it_applied(database_url: str) -> None:
    first = cli('db', 'upgrade', env={'DATABASE_URL': database_url})
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith('applied 0001: Idempotency store')
    again = cli('db', 'upgrade', env={'DATABASE_URL': database_url})
    assert again.stdout.strip() == 'database is up to date (nothing to apply)'


def test_a_missing_queue_says_to_bootstrap(settings: Settings, database_url: str) -> None:
    migrate(database_url)
    env = {
        'DATABASE_URL': database_url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': str(settings.aws_endpoint_url),
        'DAGSTER_TASKIQ_QUEUE_NAME': f'never-made-{uuid.uuid4().hex[:8]}',
    }
    error = one_line_error(cli('worker', env=env))
    assert 'does not exist' in error
    assert '`dagster-taskiq bootstrap` creates it' in error


async def test_a_metrics_port_in_use_is_a_start_up_error(
    settings: Settings, database_url: str
) -> None:
    env = await ready_env(settings, database_url)
    port = free_port()
    with socket.create_server(('0.0.0.0', port)):
        error = one_line_error(cli('worker', '--metrics-port', str(port), env=env))
    assert f'cannot serve /healthz and /metrics on port {port}' in error


@pytest.mark.slow
async def test_a_preload_module_that_cannot_be_imported_is_refused(
    settings: Settings, database_url: str
) -> None:
    env = await ready_env(settings, database_url)
    error = one_line_error(cli('worker', '--preload', 'no_such_module_here', env=env))
    assert '--preload module cannot be imported: no_such_module_here: ModuleNotFoundError' in error


def test_sqs_unreachable_is_one_line(database_url: str) -> None:
    migrate(database_url)
    env = {'DATABASE_URL': database_url, 'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': 'http://127.0.0.1:1'}
    error = one_line_error(cli('worker', env=env))
    assert 'resolve_urls failed' in error and 'http://127.0.0.1:1' in error
