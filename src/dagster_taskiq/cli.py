"""`dagster-taskiq`: database migrations, queue bootstrap (and later the worker and auto-scaler)."""

import asyncio

import click

from dagster_taskiq import store
from dagster_taskiq.logs import configure_logging
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import CircuitBreaker, QueueUrls, bootstrap, sqs_client


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
