"""`dagster-taskiq`: the worker, the auto-scaler, database migrations and queue bootstrap.

Imports only click at the top: `--help` answers without importing dagster, and the worker's
forkserver, which preloads this module, holds nothing a step does not need. Every option also
reads a `DAGSTER_TASKIQ_*` variable (an ECS task definition sets variables, not flags). A start-up
failure is one line naming what is wrong, with exit code 1; `--log-level debug` adds the trace.
"""

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from dagster_taskiq import defaults

if TYPE_CHECKING:
    from dagster_taskiq.settings import Settings

F = TypeVar('F', bound=Callable[..., Any])
ENV_PREFIX = 'DAGSTER_TASKIQ_'
DISTRIBUTION = 'dagster-taskiq'


def env_option(*names: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads DAGSTER_TASKIQ_<env>, shown in --help."""
    return click.option(*names, envvar=ENV_PREFIX + env, show_envvar=True, **kwargs)


def logging_options(command: F) -> F:
    """--log-level and --log-format, for every long-running command."""
    command = env_option(
        '--log-format',
        env='LOG_FORMAT',
        type=click.Choice(defaults.LOG_FORMATS),
        help='JSON lines, or readable lines. Default: json unless stderr is a terminal.',
    )(command)
    return env_option(
        '--log-level',
        env='LOG_LEVEL',
        type=click.Choice(defaults.LOG_LEVELS),
        default='info',
        show_default=True,
        help='debug also shows the trace of a start-up failure.',
    )(command)


@contextmanager
def reported_errors(log_level: str = 'info') -> Iterator[None]:
    """Turn our errors and invalid settings into one line on stderr and exit code 1."""
    from pydantic import ValidationError

    from dagster_taskiq.errors import DagsterTaskiqError

    try:
        yield
    except (DagsterTaskiqError, ValidationError) as error:
        if log_level == 'debug':
            from dagster_taskiq.logs import get_logger

            get_logger(__name__).error('command_failed', exc_info=error)
        click.echo(f'error: {one_line(error)}', err=True)
        sys.exit(1)


def one_line(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = [
            f'{ENV_PREFIX}{str(e["loc"][0]).upper()}: {e["msg"]}' if e['loc'] else e['msg']
            for e in error.errors()
        ]
        return 'invalid settings: ' + '; '.join(problems)
    return ' '.join(str(error).split())


def load_settings() -> 'Settings':
    from dagster_taskiq.settings import Settings

    return Settings()


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@click.group()
@click.version_option(version(DISTRIBUTION), prog_name='dagster-taskiq')
def main() -> None:
    """Run Dagster steps on async SQS workers with exactly-once completion in PostgreSQL."""


@main.group()
def db() -> None:
    """The idempotency store's database (DATABASE_URL)."""


@db.command('upgrade')
def db_upgrade() -> None:
    """Apply the store's pending migrations and say which."""
    from dagster_taskiq import store

    with reported_errors():
        database_url = load_settings().database_url
        applied = store.upgrade(database_url)
    for migration in applied:
        click.echo(f'applied {migration}')
    click.echo('database is up to date' + ('' if applied else ' (nothing to apply)'))


@main.command('bootstrap')
def bootstrap_command() -> None:
    """Create the step queue and its dead-letter queue (idempotent); print the queue URL."""
    from dagster_taskiq.sqs import bootstrap_queues

    with reported_errors():
        urls = run_async(bootstrap_queues(load_settings()))
    click.echo(urls.queue_url)


@main.command()
@env_option(
    '--concurrency',
    env='CONCURRENCY',
    type=click.IntRange(min=1),
    default=defaults.DEFAULT_CONCURRENCY,
    show_default=True,
    help='Most steps run at once.',
)
@env_option(
    '--drain-timeout',
    env='DRAIN_TIMEOUT_S',
    type=click.FloatRange(min=0),
    default=defaults.DEFAULT_DRAIN_TIMEOUT_S,
    show_default=True,
    help='Seconds running steps get to finish after SIGTERM before they are released.',
)
@env_option(
    '--poll-wait',
    env='POLL_WAIT_S',
    type=click.IntRange(0, 20),
    default=defaults.DEFAULT_POLL_WAIT_S,
    show_default=True,
    help="Long poll, s (SQS's range: 0 to 20).",
)
@env_option(
    '--metrics-port',
    env='METRICS_PORT',
    type=click.IntRange(1, 65535),
    help='Serve /healthz and /metrics on this port.',
)
@env_option(
    '--preload',
    env='PRELOAD',
    multiple=True,
    help='Module to import once in the warm step-process parent (e.g. your Definitions module); '
    'repeatable (space-separated in the variable).',
)
@env_option('--worker-id', env='WORKER_ID', help='Defaults to <host>-<pid>.')
@env_option(
    '--journal-dir',
    env='JOURNAL_DIR',
    type=click.Path(file_okay=False, path_type=Path),
    default=defaults.DEFAULT_JOURNAL_DIR,
    show_default=True,
    help='Where outcomes wait while the database is unreachable.',
)
@env_option(
    '--allow-unsigned',
    env='ALLOW_UNSIGNED',
    is_flag=True,
    help='Without a signing key, run unsigned messages (anyone who can send to the queue can '
    'then choose what runs); by default a worker without a key refuses to start.',
)
@logging_options
def worker(
    concurrency: int,
    drain_timeout: float,
    poll_wait: int,
    metrics_port: int | None,
    preload: tuple[str, ...],
    worker_id: str | None,
    journal_dir: Path,
    allow_unsigned: bool,
    log_level: str,
    log_format: Literal['json', 'console'] | None,
) -> None:
    """Run steps from the SQS queue until SIGTERM (then drain and exit 0)."""
    from dagster_taskiq.logs import configure_logging
    from dagster_taskiq.worker import WorkerOptions, default_worker_id, serve

    configure_logging(log_format, log_level)
    with reported_errors(log_level):
        options = WorkerOptions(
            concurrency=concurrency,
            drain_timeout_s=drain_timeout,
            poll_wait_s=poll_wait,
            metrics_port=metrics_port,
            preload=preload,
            worker_id=worker_id or default_worker_id(),
            journal_dir=journal_dir,
            allow_unsigned=allow_unsigned,
        )
        os.environ[ENV_PREFIX + 'WORKER_ID'] = options.worker_id  # what its steps see as theirs
        run_async(serve(load_settings(), options))


@main.command('autoscaler')
@env_option(
    '--min-workers',
    env='MIN_WORKERS',
    type=click.IntRange(min=0),
    default=defaults.DEFAULT_MIN_WORKERS,
    show_default=True,
)
@env_option(
    '--max-workers',
    env='MAX_WORKERS',
    type=click.IntRange(min=1),
    default=defaults.DEFAULT_MAX_WORKERS,
    show_default=True,
)
@env_option(
    '--target-backlog-per-worker',
    env='TARGET_BACKLOG_PER_WORKER',
    type=click.IntRange(min=1),
    default=defaults.DEFAULT_TARGET_BACKLOG_PER_WORKER,
    show_default=True,
    help='Messages (visible + in flight) one worker is expected to carry.',
)
@env_option(
    '--poll-interval',
    env='POLL_INTERVAL_S',
    type=click.FloatRange(min=0, min_open=True),
    default=defaults.DEFAULT_POLL_INTERVAL_S,
    show_default=True,
    help='Seconds between two looks at the queue.',
)
@env_option(
    '--scale-down-stabilisation',
    env='SCALE_DOWN_STABILISATION_S',
    type=click.FloatRange(min=0),
    default=defaults.DEFAULT_SCALE_DOWN_STABILISATION_S,
    show_default=True,
    help='Seconds without a higher recommendation before scaling down.',
)
@env_option(
    '--activation-threshold',
    env='ACTIVATION_THRESHOLD',
    type=click.IntRange(min=1),
    default=defaults.DEFAULT_ACTIVATION_THRESHOLD,
    show_default=True,
    help='Visible messages needed to leave zero workers.',
)
@env_option(
    '--max-step-up',
    env='MAX_STEP_UP',
    type=click.IntRange(min=1),
    help='Most workers added by one decision.',
)
@logging_options
def autoscaler_command(
    min_workers: int,
    max_workers: int,
    target_backlog_per_worker: int,
    poll_interval: float,
    scale_down_stabilisation: float,
    activation_threshold: int,
    max_step_up: int | None,
    log_level: str,
    log_format: Literal['json', 'console'] | None,
) -> None:
    """Size the worker ECS service (DAGSTER_TASKIQ_ECS_CLUSTER, _WORKER_SERVICE) by queue depth."""
    from dagster_taskiq import autoscaler
    from dagster_taskiq.logs import configure_logging

    configure_logging(log_format, log_level)
    if min_workers > max_workers:
        raise click.BadParameter(
            f'{min_workers} is above --max-workers {max_workers}', param_hint='--min-workers'
        )
    with reported_errors(log_level):
        config = load_settings()
        policy = autoscaler.ScalingPolicy(
            min_workers=min_workers,
            max_workers=max_workers,
            target_backlog_per_worker=target_backlog_per_worker,
            scale_down_stabilisation_s=scale_down_stabilisation,
            activation_threshold=activation_threshold,
            max_step_up=max_step_up,
        )
        run_async(
            autoscaler.run_autoscaler(
                config, policy, config.ecs_cluster, config.worker_service, poll_interval
            )
        )
