"""`dagster-taskiq-demo`: the demo's local platform.

`up` starts it and keeps it up (local_stack.py); `demo` starts it, runs every demo job once through
Dagster's GraphQL API, prints what happened and stops it; `ecs-agent` is the stack's stand-in for
ECS (it starts the workers the auto-scaler asks for).
"""

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import click

from dagster_taskiq.cli import load_settings, logging_options, reported_errors

if TYPE_CHECKING:
    from dagster import DagsterRunStatus
    from rich.console import Console

    from dagster_taskiq_demo.local_stack import LocalStack

# Here, not with what they configure, so that `--help` imports nothing heavy
DEFAULT_MOTO_PORT = 4566
DEFAULT_WEBSERVER_PORT = 3000
DEFAULT_AGENT_POLL_INTERVAL_S = 2.0
DEMO_TIMEOUT_S = 900.0
TERMINATE_TIMEOUT_S = 60.0  # Ctrl-C during the demo: its runs end CANCELED before the stack stops

DEFAULT_DATABASE_URL = 'postgresql://postgres@127.0.0.1:5432/dagster_taskiq_demo'
# (job, run config, whether it is meant to succeed)
DEMO_RUNS: list[tuple[str, dict[str, Any], bool]] = [
    ('fast_job', {}, True),
    ('fan_out_job', {}, True),
    ('flaky_job', {}, True),
    ('crashing_job', {}, True),
    ('side_effect_job', {}, True),
    ('slow_job', {'ops': {'sleep_then_return': {'config': {'seconds': 1.0}}}}, True),
    ('failing_job', {}, False),
]
F = TypeVar('F', bound=Callable[..., Any])


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
    try:
        connection = psycopg.connect(admin.render_as_string(False), autocommit=True)
    except psycopg.OperationalError as error:
        raise click.ClickException(
            f'PostgreSQL at {url.host}:{url.port or 5432} does not answer ({error}); set '
            'DATABASE_URL to a server the stack can use'
        ) from error
    with connection:
        exists = connection.execute(
            'SELECT 1 FROM pg_database WHERE datname = %s', (url.database,)
        ).fetchone()
        if not exists:
            connection.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(url.database)))


def stack_options(command: F) -> F:
    """The options of a command that starts the local stack."""
    for option in reversed(
        [
            click.option(
                '--env',
                'env_name',
                default='local',
                show_default=True,
                help='Environment named in resource and log-group names (/aws/ecs/SERVICE-ENV).',
            ),
            click.option(
                '--data-dir',
                default=Path('.demo'),
                type=click.Path(path_type=Path),
                show_default=True,
                help='Where the stack keeps its Dagster home, workspace, signing key and logs.',
            ),
            click.option(
                '--emulator',
                type=click.Choice(['moto', 'localstack']),
                default='moto',
                show_default=True,
                help='What serves SQS and CloudWatch Logs; moto serves ECS either way '
                "(LocalStack's free edition has none). localstack: `make localstack` first.",
            ),
            click.option(
                '--moto-port',
                type=int,
                help=f'Default {DEFAULT_MOTO_PORT}, or {DEFAULT_MOTO_PORT + 1} beside LocalStack.',
            ),
            click.option('--localstack-port', default=DEFAULT_MOTO_PORT, show_default=True),
            click.option(
                '--localstack-python',
                type=click.Path(path_type=Path),
                default=Path('.localstack/bin/python'),
                show_default=True,
                help='The Python that has LocalStack (host mode).',
            ),
            click.option('--webserver-port', default=DEFAULT_WEBSERVER_PORT, show_default=True),
            click.option(
                '--fault-proxies',
                is_flag=True,
                help='Each worker reaches SQS and its store through fault proxies of its own, '
                "which the load simulator's network-partition scenario cuts.",
            ),
            click.option(
                '--private-postgres',
                is_flag=True,
                help="The stack's own PostgreSQL in the data folder even when one answers on "
                '127.0.0.1:5432 (without DATABASE_URL and nothing there, it is the default).',
            ),
            click.option(
                '--max-workers',
                type=click.IntRange(min=1),
                default=4,
                show_default=True,
                help='Most workers the auto-scaler starts (it starts from 0).',
            ),
            click.option(
                '--worker-concurrency',
                type=click.IntRange(min=1),
                default=2,
                show_default=True,
                help='Slots per worker.',
            ),
        ]
    ):
        command = option(command)
    return command


def print_summary(console: 'Console', stack: 'LocalStack') -> None:
    from rich.table import Table

    table = Table(title=f'dagster-taskiq local stack ({stack.options.env_name})')
    for column in ('component', 'URL / port', 'PID', 'started in', 'log'):
        table.add_column(column)
    for component in stack.components:
        table.add_row(
            component.name,
            component.url or '',
            str(component.pid or ''),
            f'{component.start_s:.1f} s' if component.start_s is not None else '',
            str(component.log_path),
        )
    console.print(table)
    console.print(
        f'Database {stack.database_url}; worker logs in {stack.data_dir / "workers"}. '
        'Workers start when work arrives (the auto-scaler starts from 0).',
        soft_wrap=True,
    )
    console.print('Up. Ctrl-C stops everything.')


@contextmanager
def running_stack(
    options: dict[str, Any], log_level: str, log_format: Any
) -> Iterator['LocalStack']:
    """The local stack, started (with progress, then a summary), stopped on the way out."""
    from dotenv import load_dotenv
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dagster_taskiq.logs import configure_logging
    from dagster_taskiq_demo.local_stack import (
        LocalStack,
        StackError,
        StackOptions,
        port_in_use,
        postgres_bin_dir,
        stop_signals,
    )

    load_dotenv(Path('.env'))  # .env.example lists them; the environment wins
    configure_logging(log_format or 'console', log_level)
    logging.getLogger('alembic').setLevel(logging.WARNING)  # each migration's lines: noise here
    console = Console()
    database_url = os.environ.get('DATABASE_URL')
    private_postgres = options.pop('private_postgres')
    if private_postgres and database_url is not None:
        raise click.UsageError(
            '--private-postgres and DATABASE_URL both name the database: unset one'
        )
    if database_url is None and port_in_use(5432) and not private_postgres:  # one listens: use it
        database_url = DEFAULT_DATABASE_URL
    emulator, localstack_python = options.pop('emulator'), options.pop('localstack_python')
    if emulator == 'localstack':
        options['localstack_python'] = localstack_python.absolute()
    if options['moto_port'] is None:
        options['moto_port'] = DEFAULT_MOTO_PORT + (emulator == 'localstack')
    with stop_signals() as stopping:
        stack = LocalStack(StackOptions(database_url=database_url, **options), stopping)
        try:
            stack.lock()
            stack.check_ports()
            if database_url is None:
                bin_dir = postgres_bin_dir()
                console.print(
                    f'PostgreSQL of its own in {stack.data_dir / "postgres"} (from {bin_dir})',
                    markup=False,
                    soft_wrap=True,
                )
                stack.start_private_postgres(bin_dir)
            ensure_database(stack.database_url)
            stack.prepare()
            with Progress(
                SpinnerColumn(),
                TextColumn('{task.description}'),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                for name, step in stack.start_steps():
                    task = progress.add_task(f'starting {name}', total=1)
                    step()
                    progress.update(task, completed=1, description=f'{name} ready')
            print_summary(console, stack)
            yield stack
        except StackError as error:
            console.print(str(error), style='red', markup=False, soft_wrap=True)
            sys.exit(1)
        finally:
            console.print('stopping the stack (workers drain first)...')
            stack.stop()
            console.print('stopped')


@main.command()
@stack_options
@logging_options
def up(log_level: str, log_format: Literal['json', 'console'] | None, **options: Any) -> None:
    """Start the local platform and keep it up until Ctrl-C or SIGTERM.

    moto (SQS, ECS, CloudWatch Logs), the Dagster webserver and daemon on PostgreSQL, the
    auto-scaler and the local ECS agent, which starts the workers the scaler asks for.
    """
    with running_stack(options, log_level, log_format) as stack:
        stack.supervise()


@main.command()
@stack_options
@logging_options
def demo(log_level: str, log_format: Literal['json', 'console'] | None, **options: Any) -> None:
    """Start the local platform, run every demo job once through the UI's API, report, stop."""
    from rich.console import Console

    from dagster_taskiq_demo.runs import (
        Interrupted,
        graphql_client,
        submit,
        terminate,
        wait_ended,
    )

    console = Console()
    with running_stack(options, log_level, log_format) as stack:
        console.print(
            'Submitting every demo job once. failing_job is meant to fail; flaky_job and '
            'crashing_job fail their first attempt (a raise, a dying process) and pass on retry.'
        )
        web = next(c for c in stack.components if c.name == 'dagster-webserver')
        client = graphql_client(str(web.url))
        run_ids = [submit(client, job, config) for job, config, _ in DEMO_RUNS]
        try:
            statuses = wait_ended(client, run_ids, DEMO_TIMEOUT_S, stack.stopping)
        except Interrupted:
            console.print('interrupted: terminating the runs still going, then stopping the stack')
            print_runs(console, stack, run_ids, terminate(client, run_ids, TERMINATE_TIMEOUT_S))
            sys.exit(130)
        except TimeoutError as error:
            console.print(
                f'{error}\nWhy steps wait: `dagster-taskiq-demo ecs status` (did the scaler ask '
                f'for workers?), `queue depth`, the logs in {stack.logs}; a step queued past '
                'step_queued_timeout_seconds (an hour) fails saying how deep the queue was and '
                'how many workers were live.',
                style='red',
                markup=False,
                soft_wrap=True,
            )
            sys.exit(1)
        as_expected = print_runs(console, stack, run_ids, statuses)
        console.print(f'Runs in the UI: {web.url}/runs (they stay after the stack stops: `up`)')
    console.print('every job ended as expected' if as_expected else 'a job did NOT end as expected')
    sys.exit(0 if as_expected else 1)


def print_runs(
    console: 'Console',
    stack: 'LocalStack',
    run_ids: list[str],
    statuses: dict[str, 'DagsterRunStatus'],
) -> bool:
    """The demo runs as a table (Dagster's status, the store's steps and workers); whether each
    ended as expected."""
    from rich.table import Table

    from dagster_taskiq_demo.runs import run_steps

    table = Table(title='demo runs')
    for column in ('job', 'status', 'expected', 'steps', 'attempts', 'retries', 'workers'):
        table.add_column(column)
    as_expected = True
    for (job, _, meant_to_succeed), run_id in zip(DEMO_RUNS, run_ids, strict=True):
        status = statuses[run_id]
        expected = 'SUCCESS' if meant_to_succeed else 'FAILURE'
        as_expected &= status.value == expected
        steps = run_steps(stack.database_url, run_id)
        table.add_row(
            job,
            status.value,
            expected,
            str(steps.steps),
            str(steps.attempts),
            str(steps.retries),
            ', '.join(steps.workers),
        )
    console.print(table)
    return as_expected


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
@click.option(
    '--fault-proxies',
    is_flag=True,
    help='Each worker reaches SQS and its store through proxies of its own, cut as '
    '<data dir>/partitions.json says.',
)
@logging_options
def ecs_agent(
    poll_interval: float,
    worker_concurrency: int,
    data_dir: Path,
    preload: tuple[str, ...],
    fault_proxies: bool,
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
    if fault_proxies and settings.aws_endpoint_url is None:
        raise click.UsageError('--fault-proxies needs an emulator endpoint (AWS_ENDPOINT_URL)')
    data_dir.mkdir(parents=True, exist_ok=True)
    ecs = boto3.client('ecs', endpoint_url=settings.ecs_endpoint, region_name=settings.aws_region)
    agent = LocalEcsAgent(
        ecs,
        settings.ecs_cluster,
        settings.worker_service,
        data_dir.resolve(),
        worker_args=('--concurrency', str(worker_concurrency)),
        preload=preload,
        links={'sqs': str(settings.aws_endpoint_url), 'store': settings.database_url}
        if fault_proxies
        else None,
    )
    agent.run(poll_interval)


# ----- operations (the seed's `mise run` tasks) -----


@contextmanager
def operation_errors() -> Iterator[None]:
    """AWS or database errors of an operations command as one line naming what failed."""
    import psycopg
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise click.ClickException(f'AWS call failed: {error} (is the stack up?)') from error
    except psycopg.OperationalError as error:
        raise click.ClickException(f'the database does not answer: {error}') from error


def with_operation_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with operation_errors():
            return command(*args, **kwargs)

    return cast(F, wrapped)


def target_options(command: F) -> F:
    """Where the stack's resources are, and --json; AWS and database errors as one line."""
    command = with_operation_errors(command)
    command = click.option('--json', 'as_json', is_flag=True, help='JSON instead of a table.')(
        command
    )
    command = click.option(
        '--env',
        'env_name',
        default='local',
        show_default=True,
        help='Environment, when there is no stack.json (e.g. on AWS).',
    )(command)
    return click.option(
        '--data-dir',
        default=Path('.demo'),
        type=click.Path(path_type=Path),
        show_default=True,
        help="A running stack's folder (its stack.json names its resources).",
    )(command)


def show(rows: list[dict[str, Any]] | dict[str, Any], as_json: bool, title: str) -> None:
    """`rows` as JSON, or as a table (one row per item)."""
    import json

    from rich.console import Console
    from rich.table import Table

    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    items = rows if isinstance(rows, list) else [rows]
    table = Table(title=title)
    columns = list(items[0]) if items else ['(none)']
    for column in columns:
        table.add_column(column)
    for item in items:
        table.add_row(*(str(item[c]) for c in columns))
    Console().print(table)


@main.group()
def queue() -> None:
    """The step queue, its retry queue and their dead-letter queue."""


@queue.command('depth')
@target_options
def queue_depth(data_dir: Path, env_name: str, as_json: bool) -> None:
    """Visible, in-flight and delayed messages of each queue."""
    from dagster_taskiq_demo import operations

    show(operations.queue_depth(operations.find_target(data_dir, env_name)), as_json, 'queues')


@queue.command('dlq')
@click.option('--redrive', is_flag=True, help='Send every dead letter back to the step queue.')
@target_options
def queue_dlq(data_dir: Path, env_name: str, as_json: bool, redrive: bool) -> None:
    """The dead letters with the reason each was set aside."""
    from dagster_taskiq_demo import operations

    target = operations.find_target(data_dir, env_name)
    letters = operations.dead_letters(target, redrive=redrive)
    show(letters, as_json, 'dead letters (redriven)' if redrive else 'dead letters')


@main.group()
def ecs() -> None:
    """The ECS services of the stack."""


@ecs.command('status')
@click.argument('service', required=False)
@target_options
def ecs_status(data_dir: Path, env_name: str, as_json: bool, service: str | None) -> None:
    """A service's desired and running counts and the auto-scaler's recent decisions."""
    from dagster_taskiq_demo import operations

    status = operations.ecs_status(operations.find_target(data_dir, env_name), service)
    if as_json:
        show(status, True, '')
        return
    decisions = status.pop('recent_decisions')
    show(status, False, 'service')
    show(decisions, False, 'recent scaling decisions')


@main.group('aws')
def aws_group() -> None:
    """What runs on (emulated) AWS."""


@aws_group.command('services')
@target_options
def aws_services(data_dir: Path, env_name: str, as_json: bool) -> None:
    """The cluster's ECS services."""
    from dagster_taskiq_demo import operations

    show(operations.services(operations.find_target(data_dir, env_name)), as_json, 'services')


@aws_group.command('tasks')
@target_options
def aws_tasks(data_dir: Path, env_name: str, as_json: bool) -> None:
    """The cluster's running ECS tasks."""
    from dagster_taskiq_demo import operations

    show(operations.tasks(operations.find_target(data_dir, env_name)), as_json, 'tasks')


@main.group()
def logs() -> None:
    """CloudWatch Logs of the stack's services."""


@logs.command('tail')
@click.argument(
    'service',
    type=click.Choice(['dagster-daemon', 'dagster-webserver', 'taskiq-worker', 'auto-scaler']),
)
@click.option('--since', default='10m', show_default=True, help='How far back: 30s, 5m, 2h, 1d.')
@click.option('--follow', is_flag=True, help='Keep printing new events until Ctrl-C.')
@target_options
def logs_tail(
    data_dir: Path, env_name: str, as_json: bool, service: str, since: str, follow: bool
) -> None:
    """A service's log events from its group /aws/ecs/SERVICE-ENV (one line each)."""
    import json
    import time
    from datetime import UTC, datetime

    from dagster_taskiq_demo import operations

    try:
        since_s = operations.parse_since(since)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint='--since') from error
    target = operations.find_target(data_dir, env_name)
    seen: set[str] = set()
    while True:
        for event in operations.log_events(target, service, since_s, seen):
            seen.add(event['event_id'])
            if as_json:
                click.echo(json.dumps(event))
            else:
                at = datetime.fromtimestamp(event['timestamp'], UTC).strftime('%H:%M:%S')
                click.echo(f'{at} {event["stream"]} {event["message"]}')
        if not follow:
            return
        time.sleep(1.0)  # CloudWatch has no push: poll, as `aws logs tail --follow` does
