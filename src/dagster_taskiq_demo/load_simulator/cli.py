"""The load simulator's commands, as the seed runs them:
`python -m dagster_taskiq_demo.load_simulator.cli steady-load --jobs-per-minute 6 --duration 300`.

Scenarios run against the stack `dagster-taskiq-demo up` keeps in `--data-dir` (its stack.json);
intervals are minutes and durations seconds, as in the seed. `verify` reads the stack's database.
"""

import functools
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from rich.console import Console
from rich.table import Table

F = TypeVar('F', bound=Callable[..., Any])


@click.group()
def main() -> None:
    """Load scenarios with real faults against the local stack, and `verify`."""


def scenario_options(command: F) -> F:
    """--data-dir, --seed and --wait-timeout; runs the plan the command returns."""

    @click.option(
        '--data-dir',
        default=Path('.demo'),
        type=click.Path(path_type=Path),
        show_default=True,
        help='The data folder of the running stack (`dagster-taskiq-demo up`).',
    )
    @click.option('--seed', type=int, help='Makes every random choice reproducible (default: new).')
    @click.option(
        '--wait-timeout',
        default=600.0,
        show_default=True,
        help='Seconds the runs may take to end after the last submission.',
    )
    @functools.wraps(command)
    def wrapper(data_dir: Path, seed: int | None, wait_timeout: float, **options: Any) -> None:
        from dagster_taskiq_demo.load_simulator.scenarios import (
            ScenarioError,
            run_scenario,
            summary,
        )
        from dagster_taskiq_demo.load_simulator.verify import verify
        from dagster_taskiq_demo.local_stack import stop_signals
        from dagster_taskiq_demo.operations import find_target

        seed = random.randrange(2**31) if seed is None else seed
        plan = command(rng=random.Random(seed), **options)
        console = Console()
        with stop_signals() as stop:
            try:
                result = run_scenario(plan, seed, data_dir, console, stop, wait_timeout)
            except ScenarioError as error:
                raise click.ClickException(str(error)) from error
        console.print(summary(result))
        report = verify(find_target(data_dir, 'local').database_url, result.scenario_id)
        print_report(console, report)
        if stop.is_set():
            console.print('interrupted: the runs submitted so far go on in the stack')
            sys.exit(130)
        if not result.ended:
            console.print(f'not every run ended within {wait_timeout:.0f} s of the last submission')
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


DURATION = click.option(
    '--duration', type=click.FloatRange(min=1), required=True, help='Seconds of load.'
)


@main.command('steady-load')
@click.option('--jobs-per-minute', type=click.FloatRange(min=0.1), default=6.0, show_default=True)
@DURATION
@scenario_options
def steady_load(rng: random.Random, jobs_per_minute: float, duration: float) -> Any:
    """Runs at a steady rate (fast, slow, side-effect and recorded jobs)."""
    from dagster_taskiq_demo.load_simulator.scenarios import steady_plan

    return steady_plan(rng, jobs_per_minute, duration)


@main.command('burst-load')
@click.option('--burst-size', type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    '--burst-interval', type=click.FloatRange(min=0.01), default=5.0, show_default=True,
    help='Minutes between bursts.',
)  # fmt: skip
@DURATION
@scenario_options
def burst_load(rng: random.Random, burst_size: int, burst_interval: float, duration: float) -> Any:
    """`burst-size` runs at once, every `burst-interval` minutes."""
    from dagster_taskiq_demo.load_simulator.scenarios import burst_plan

    return burst_plan(rng, burst_size, burst_interval, duration)


@main.command('mixed-workload')
@click.option('--jobs-per-minute', type=click.FloatRange(min=0.1), default=6.0, show_default=True)
@DURATION
@scenario_options
def mixed_workload(rng: random.Random, jobs_per_minute: float, duration: float) -> Any:
    """Fast, slow, fan-out, failing, flaky (retrying), crashing, side-effect and recorded jobs,
    each at least once."""
    from dagster_taskiq_demo.load_simulator.scenarios import mixed_plan

    return mixed_plan(rng, jobs_per_minute, duration)


@main.command('worker-failure')
@click.option('--failure-burst-size', type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    '--recovery-interval', type=click.FloatRange(min=0.01), default=2.0, show_default=True,
    help='Minutes between failure bursts.',
)  # fmt: skip
@DURATION
@scenario_options
def worker_failure(
    rng: random.Random, failure_burst_size: int, recovery_interval: float, duration: float
) -> Any:
    """Bursts of runs; each burst, a worker running a step is SIGKILLed; once, one is frozen
    (SIGSTOP) past its lease, then resumed; where the stack runs its own PostgreSQL, it is
    restarted once mid-load."""
    from dagster_taskiq_demo.load_simulator.scenarios import worker_failure_plan

    return worker_failure_plan(rng, failure_burst_size, recovery_interval, duration)


@main.command('network-partition')
@click.option('--max-burst-size', type=click.IntRange(min=1), default=5, show_default=True)
@DURATION
@scenario_options
def network_partition(rng: random.Random, max_burst_size: int, duration: float) -> Any:
    """Bursts of runs while workers are cut off from SQS, their store or both (packets dropped
    with connections left open, or connections reset), one worker or all, 10-60 s each. Needs a
    stack started with `up --fault-proxies`."""
    from dagster_taskiq_demo.load_simulator.scenarios import network_partition_plan

    return network_partition_plan(rng, max_burst_size, duration)


@main.command('verify')
@click.option(
    '--data-dir',
    default=Path('.demo'),
    type=click.Path(path_type=Path),
    show_default=True,
    help='The stack whose database to read (its stack.json); else DATABASE_URL.',
)
@click.option('--scenario', 'scenario_id', help='Only the runs of this scenario (default: all).')
@click.option('--output', type=click.Path(path_type=Path), help='Write the report here.')
@click.option('--format', 'output_format', type=click.Choice(['json', 'csv']), default='json')
@click.option(
    '--chart',
    type=click.Path(path_type=Path),
    help='Write the chart as CHART.png and CHART.html (default: beside --output, same name).',
)
@click.option(
    '--settle', default=60.0, show_default=True,
    help='Seconds a run may show no progress, or a lease stay expired, before it is stranded.',
)  # fmt: skip
def verify_command(
    data_dir: Path,
    scenario_id: str | None,
    output: Path | None,
    output_format: Literal['json', 'csv'],
    chart: Path | None,
    settle: float,
) -> None:
    """Find every way exactly-once could have broken; exit 1 if any was found."""
    from dagster_taskiq_demo.load_simulator.chart import write_chart
    from dagster_taskiq_demo.load_simulator.verify import as_dict, verify, write_csv, write_json
    from dagster_taskiq_demo.operations import find_target

    report = verify(find_target(data_dir, 'local').database_url, scenario_id, settle)
    console = Console()
    print_report(console, report)
    if output is not None:
        (write_csv if output_format == 'csv' else write_json)(report, output)
        console.print(f'report written to {output}', markup=False, soft_wrap=True)
    chart = chart or (output.with_suffix('') if output is not None else None)
    if chart is not None:
        png, page = write_chart(as_dict(report), chart)
        console.print(f'chart written to {png} and {page}', markup=False, soft_wrap=True)
    sys.exit(1 if report.failed else 0)


def print_report(console: Console, report: Any) -> None:
    table = Table(title=f'verify: {report.scope}')
    table.add_column('figure')
    table.add_column('value', justify='right')
    for status, runs in report.runs_by_status.items():
        table.add_row(f'runs {status}', str(runs))
    for name, value in report.counts.items():
        table.add_row(name.replace('_', ' '), str(value))
    for kind, figures in report.percentiles_s.items():
        shown = '/'.join(
            '-' if figures[p] is None else f'{figures[p]:.2f}' for p in ('p50', 'p95', 'p99')
        )
        table.add_row(f'{kind.replace("_", " ")} s p50/p95/p99', shown)
    table.add_row('faults injected', str(len(report.faults)))
    for name, count in report.failures.items():
        table.add_row(name.replace('_', ' '), str(count), style='red' if count else None)
    console.print(table)
    for name, findings in report.findings.items():
        for finding in findings[:20]:
            console.print(
                f'{name}: {finding["run_id"]} {finding["step_key"]}: {finding["what"]}',
                style='red',
                markup=False,
                soft_wrap=True,
            )
    console.print('VERIFIED: none of the failure classes found' if not report.failed else 'FAILED')


if __name__ == '__main__':
    main()
