"""`dagster-taskiq`: the worker, database migrations and queue bootstrap."""

import asyncio
from pathlib import Path

import click

from dagster_taskiq import autoscaler, store
from dagster_taskiq.logs import configure_logging
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import CircuitBreaker, QueueUrls, bootstrap, sqs_client
from dagster_taskiq.worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_POLL_WAIT_S,
    WorkerOptions,
    default_worker_id,
    serve,
)


@click.group()
def main() -> None:
    """Run Dagster steps on async SQS workers with exactly-once completion in PostgreSQL."""
    configure_logging()


@main.group()
def db() -> None:
    """The idempotency store's database (DATABASE_URL)."""


@db.command('upgrade')
def db_upgrade() -> None:
    """Apply the store's pending migrations."""
    store.upgrade(Settings().database_url)
    click.echo('database is up to date')


async def bootstrap_queues(settings: Settings) -> QueueUrls:
    breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
    async with sqs_client(settings) as client:
        return await bootstrap(client, settings, breaker)


@main.command('bootstrap')
def bootstrap_command() -> None:
    """Create the step queue and its dead-letter queue (idempotent); print the queue URL."""
    urls = asyncio.run(bootstrap_queues(Settings()))
    click.echo(urls.queue_url)


@main.command()
@click.option('--concurrency', default=DEFAULT_CONCURRENCY, show_default=True, help='Step slots.')
@click.option(
    '--drain-timeout',
    default=DEFAULT_DRAIN_TIMEOUT_S,
    show_default=True,
    help='Seconds running steps get to finish after SIGTERM before they are released.',
)
@click.option('--poll-wait', default=DEFAULT_POLL_WAIT_S, show_default=True, help='Long poll, s.')
@click.option('--metrics-port', type=int, help='Serve /healthz and /metrics on this port.')
@click.option(
    '--preload',
    multiple=True,
    help='Module to import once in the warm step-process parent (e.g. your Definitions module).',
)
@click.option('--worker-id', default=default_worker_id, help='Defaults to <host>-<pid>.')
@click.option(
    '--journal-dir',
    type=click.Path(file_okay=False, path_type=Path),
    default=Path('.dagster-taskiq-journal'),
    show_default=True,
    help='Where outcomes wait while the database is unreachable.',
)
def worker(
    concurrency: int,
    drain_timeout: float,
    poll_wait: int,
    metrics_port: int | None,
    preload: tuple[str, ...],
    worker_id: str,
    journal_dir: Path,
) -> None:
    """Run steps from the SQS queue until SIGTERM (then drain and exit 0)."""
    options = WorkerOptions(
        concurrency=concurrency,
        drain_timeout_s=drain_timeout,
        poll_wait_s=poll_wait,
        metrics_port=metrics_port,
        preload=preload,
        worker_id=worker_id,
        journal_dir=journal_dir,
    )
    asyncio.run(serve(Settings(), options))


@main.command('autoscaler')
@click.option('--min-workers', default=autoscaler.DEFAULT_MIN_WORKERS, show_default=True)
@click.option('--max-workers', default=autoscaler.DEFAULT_MAX_WORKERS, show_default=True)
@click.option(
    '--target-backlog-per-worker',
    default=autoscaler.DEFAULT_TARGET_BACKLOG_PER_WORKER,
    show_default=True,
    help='Messages (visible + in flight) one worker is expected to carry.',
)
@click.option('--poll-interval', default=autoscaler.DEFAULT_POLL_INTERVAL_S, show_default=True)
@click.option(
    '--scale-down-stabilisation',
    default=autoscaler.DEFAULT_SCALE_DOWN_STABILISATION_S,
    show_default=True,
    help='Seconds without a higher recommendation before scaling down.',
)
@click.option(
    '--activation-threshold',
    default=autoscaler.DEFAULT_ACTIVATION_THRESHOLD,
    show_default=True,
    help='Visible messages needed to leave zero workers.',
)
@click.option('--max-step-up', type=int, help='Most workers added by one decision.')
def autoscaler_command(
    min_workers: int,
    max_workers: int,
    target_backlog_per_worker: int,
    poll_interval: float,
    scale_down_stabilisation: float,
    activation_threshold: int,
    max_step_up: int | None,
) -> None:
    """Size the worker ECS service (DAGSTER_TASKIQ_ECS_CLUSTER, _WORKER_SERVICE) by queue depth."""
    settings = Settings()
    policy = autoscaler.ScalingPolicy(
        min_workers=min_workers,
        max_workers=max_workers,
        target_backlog_per_worker=target_backlog_per_worker,
        scale_down_stabilisation_s=scale_down_stabilisation,
        activation_threshold=activation_threshold,
        max_step_up=max_step_up,
    )
    asyncio.run(
        autoscaler.run_autoscaler(
            settings, policy, settings.ecs_cluster, settings.worker_service, poll_interval
        )
    )
