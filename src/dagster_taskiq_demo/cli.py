"""`dagster-taskiq-demo`: the demo's local stack.

For now `up` starts the emulator, prepares PostgreSQL, the queues and a Dagster home, starts two
workers, runs every demo job through them and prints what the store saw; the auto-scaler and
local-stack issues make it the long-running stack of DESIGN.md (webserver, daemon, ECS agent).
"""

import asyncio
import os
import secrets
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import click

from dagster_taskiq.cli import load_settings, logging_options, reported_errors

# Here, not with what they configure, so that `--help` imports nothing heavy
DEFAULT_MOTO_PORT = 4566
DEFAULT_AGENT_POLL_INTERVAL_S = 2.0

DEFAULT_DATABASE_URL = 'postgresql://postgres@127.0.0.1:5432/dagster_taskiq_demo'
DEMO_RUNS: list[tuple[str, dict[str, Any]]] = [
    ('fast_job', {}),
    ('fan_out_job', {}),
    ('flaky_job', {}),
    ('crashing_job', {}),
    ('side_effect_job', {}),
    ('slow_job', {'ops': {'sleep_then_return': {'config': {'seconds': 1.0}}}}),
    ('failing_job', {}),
]


@click.group()
@click.version_option(version('dagster-taskiq'), prog_name='dagster-taskiq-demo')
def main() -> None:
    """The dagster-taskiq demo application."""


def ensure_database(database_url: str) -> None:
    """Create the database of `database_url` unless it exists."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if not url.database:
        raise click.UsageError(f'DATABASE_URL names no database: {database_url}')
    admin = url.set(drivername='postgresql', database='postgres', query={})
    with psycopg.connect(admin.render_as_string(False), autocommit=True) as connection:
        exists = connection.execute(
            'SELECT 1 FROM pg_database WHERE datname = %s', (url.database,)
        ).fetchone()
        if not exists:
            connection.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(url.database)))


def run_demo_jobs(database_url: str) -> bool:
    from dagster import DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from dagster_taskiq import store
    from dagster_taskiq_demo import definitions

    repository = ReconstructableRepository.for_module(definitions.__name__, 'defs', os.getcwd())
    engine = store.sync_engine(database_url)
    all_as_expected = True
    try:
        with DagsterInstance.get() as instance:
            for job_name, run_config in DEMO_RUNS:
                job = repository.get_reconstructable_job(job_name)
                with execute_job(job, instance, run_config=run_config) as result:
                    success, run_id = result.success, result.run_id
                with engine.connect() as connection:
                    rows = connection.execute(store.QUERIES['list_executions'], {'run_id': run_id})
                    states = [f'{r.step_key}#{r.attempt}={r.state}' for r in rows]
                expected = job_name != 'failing_job'
                all_as_expected &= success == expected
                status = 'SUCCESS' if success else 'FAILURE'
                click.echo(f'{job_name:16} {status:8} {run_id}  {", ".join(states)}')
    finally:
        engine.dispose()
    return all_as_expected


@main.command()
@click.option('--moto-port', default=DEFAULT_MOTO_PORT, show_default=True)
@click.option('--workers', default=2, show_default=True)
@click.option(
    '--data-dir', default=Path('.demo'), type=click.Path(path_type=Path), show_default=True
)
@logging_options
def up(
    moto_port: int,
    workers: int,
    data_dir: Path,
    log_level: str,
    log_format: Literal['json', 'console'] | None,
) -> None:
    """Start the emulator, the store, the queues and workers; run every demo job through them."""
    from dagster_taskiq import store
    from dagster_taskiq.logs import configure_logging
    from dagster_taskiq.sqs import bootstrap_queues
    from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, start_moto
    from dagster_taskiq_demo.stack import spawn_worker, wait_started, write_dagster_home

    configure_logging(log_format, log_level)
    os.environ.update({k: os.environ.get(k, v) for k, v in EMULATOR_CREDENTIALS.items()})
    database_url = os.environ.get('DATABASE_URL', DEFAULT_DATABASE_URL)
    ensure_database(database_url)
    store.upgrade(database_url)
    server = start_moto(moto_port)
    data_dir = data_dir.resolve()
    os.environ.update(
        {
            'DATABASE_URL': database_url,
            'DAGSTER_HOME': str(write_dagster_home(data_dir / 'dagster_home', database_url)),
            'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': server.url,
        }
    )
    os.environ.setdefault('DAGSTER_TASKIQ_SIGNING_KEY', secrets.token_hex(16))  # workers need one
    started = []
    try:
        with reported_errors(log_level):
            urls = asyncio.run(bootstrap_queues(load_settings()))
        click.echo(f'emulator {server.url}, queue {urls.queue_url}, database {database_url}')
        started = [spawn_worker(f'demo-worker-{n}', data_dir) for n in range(workers)]
        wait_started(started)
        click.echo(f'{workers} workers up (logs in {data_dir}); running the demo jobs:')
        as_expected = run_demo_jobs(database_url)
    finally:
        for worker in started:
            worker.stop()
        server.stop()
    click.echo('every job ended as expected' if as_expected else 'a job did NOT end as expected')
    sys.exit(0 if as_expected else 1)


@main.command('ecs-agent')
@click.option(
    '--poll-interval',
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_AGENT_POLL_INTERVAL_S,
    show_default=True,
)
@click.option(
    '--worker-concurrency',
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help='Slots per worker.',
)
@click.option(
    '--data-dir', default=Path('.demo'), type=click.Path(path_type=Path), show_default=True
)
@click.option('--preload', multiple=True, help='Module each worker preloads (repeatable).')
@logging_options
def ecs_agent(
    poll_interval: float,
    worker_concurrency: int,
    data_dir: Path,
    preload: tuple[str, ...],
    log_level: str,
    log_format: Literal['json', 'console'] | None,
) -> None:
    """Reconcile the worker service's desiredCount into local worker processes (until SIGTERM)."""
    import boto3  # type: ignore[import-untyped]

    from dagster_taskiq.logs import configure_logging
    from dagster_taskiq_demo.ecs_agent import LocalEcsAgent

    configure_logging(log_format, log_level)
    with reported_errors(log_level):
        settings = load_settings()
    data_dir.mkdir(parents=True, exist_ok=True)
    ecs = boto3.client(
        'ecs', endpoint_url=settings.aws_endpoint_url, region_name=settings.aws_region
    )
    agent = LocalEcsAgent(
        ecs,
        settings.ecs_cluster,
        settings.worker_service,
        data_dir.resolve(),
        worker_args=('--concurrency', str(worker_concurrency)),
        preload=preload,
    )
    agent.run(poll_interval)
