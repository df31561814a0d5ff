"""The same jobs on the executors a user would pick instead of ours, side by side in one invocation.

    .venv/bin/python bench/executors.py [--repeat 3] [--workers 2] [--concurrency 1]
        [--parallel-runs 4] [--jobs chain fan_out many] [--executors ...] [--json PATH]

Jobs (bench_jobs.py): a 20-op chain, a 50-op fan-out/fan-in (52 steps), and `many`: 200
independent 10 ms ops spread over 20 runs of 10, `--parallel-runs` runs at a time. Executors:
in_process (the floor), multiprocess (max_concurrent: as many as the workers' slots; spawn:
Dagster's default),
mp_forkserver (the same, forked from a forkserver preloading dagster, dagster_postgres and
bench_jobs), dagster-celery's celery_executor (RabbitMQ on 127.0.0.1:5672, `--workers` Celery
workers of `--concurrency` processes each) and taskiq_executor (`--workers` workers x
`--concurrency` slots).
One PostgreSQL-backed Dagster instance for all.
Each job runs `--repeat` times, executors interleaved; the table shows medians: wall time per run
(per batch for `many`), per-step overhead over in_process, steps per second and each executor's
time as a ratio to taskiq's.
"""

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import bench_jobs
from harness import (
    CELERY_BROKER_URL,
    bench_stack,
    machine,
    start_celery_workers,
    start_taskiq_workers,
    timed_run,
    write_json,
)

MANY_RUNS = 20
# The strongest multiprocess setting a Dagster user would pick: each step forked from a forkserver
# that imported dagster, dagster_postgres (the instance's storage) and the job's module once,
# instead of a fresh Python per step (spawn).
# Preloading bench_jobs also loads dagster_celery (celery itself it imports lazily, not here) and
# dagster_taskiq.executor (SQLAlchemy, structlog, pydantic-settings) into the forkserver and every
# step, as any extra import of a user's code module would be: it costs the forkserver's start, once.
# harness is no user's choice: every child re-runs the run process's main script, this file
# (Python 3.11's forkserver ignores '__main__' in the preload list), and harness's imports (~1 s:
# psycopg, aioboto3, botocore) would be a per-step cost that a user's run process, whose main is
# Dagster's CLI (imported by `import dagster`), does not have.
# Python keeps one forkserver per process, started by the first run that needs it and reused by
# every later run there (chain and fan_out run in this process, `many` in the pool's processes):
# only a process's first mp_forkserver run pays that start, not each run as under a run launcher
# that starts a process per run.
FORKSERVER_PRELOAD = ['dagster', 'dagster_postgres', 'bench_jobs', 'harness']
# steps at once for the multiprocess executors (the taskiq and Celery slots: --workers x
# --concurrency), through the environment so that the pool's run processes see it too
PARALLEL_STEPS_ENV = 'BENCH_PARALLEL_STEPS'


def run_config(executor: str) -> dict[str, Any]:
    max_concurrent = int(os.environ.get(PARALLEL_STEPS_ENV, '2'))
    return {
        'in_process': {},
        'multiprocess': {'execution': {'config': {'max_concurrent': max_concurrent}}},
        'mp_forkserver': {
            'execution': {
                'config': {
                    'max_concurrent': max_concurrent,
                    'start_method': {'forkserver': {'preload_modules': FORKSERVER_PRELOAD}},
                }
            }
        },
        'celery': {'execution': {'config': {'broker': CELERY_BROKER_URL}}},
        'taskiq': {},
    }[executor]


def run_job(graph: str, executor: str) -> float:
    return timed_run(f'{graph}__{executor}', run_config(executor))[0]


def run_many(pool: ProcessPoolExecutor, executor: str) -> float:
    """Wall time of MANY_RUNS runs of `many`, submitted at once to the pool of run processes."""
    started = time.perf_counter()
    runs = [pool.submit(run_job, 'many', executor) for _ in range(MANY_RUNS)]
    for run in runs:
        run.result()
    return time.perf_counter() - started


def measure(
    graphs: list[str], executors: list[str], repeat: int, parallel_runs: int
) -> dict[str, dict[str, list[float]]]:
    times = {graph: {executor: [] for executor in executors} for graph in graphs}
    # run processes for `many`, started once (each imports dagster), as a run launcher would
    with ProcessPoolExecutor(parallel_runs, mp_context=get_context('forkserver')) as pool:
        for repetition in range(repeat):
            for graph in graphs:
                for executor in executors:
                    if graph == 'many':
                        seconds = run_many(pool, executor)
                    else:
                        seconds = run_job(graph, executor)
                    times[graph][executor].append(seconds)
                    print(
                        f'  run {repetition + 1}/{repeat} {graph:8} {executor:13} {seconds:7.2f} s'
                    )
    return times


def summarise(times: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for graph, by_executor in times.items():
        steps = bench_jobs.STEPS[graph] * (MANY_RUNS if graph == 'many' else 1)
        medians = {executor: statistics.median(runs) for executor, runs in by_executor.items()}
        for executor, median_s in medians.items():
            rows.append(
                {
                    'job': graph,
                    'steps': steps,
                    'executor': executor,
                    'median_s': round(median_s, 3),
                    'runs_s': [round(s, 3) for s in by_executor[executor]],
                    'overhead_per_step_ms': round(
                        (median_s - medians['in_process']) / steps * 1000, 1
                    )
                    if 'in_process' in medians
                    else None,
                    'steps_per_s': round(steps / median_s, 2),
                    'ratio_to_taskiq': round(median_s / medians['taskiq'], 2)
                    if 'taskiq' in medians
                    else None,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f'{"job":8} {"steps":>5} {"executor":13} {"median s":>9} {"+ms/step":>9} '
    print(header + f'{"steps/s":>8} {"x taskiq":>9}')
    for row in rows:
        overhead, ratio = row['overhead_per_step_ms'], row['ratio_to_taskiq']
        print(
            f'{row["job"]:8} {row["steps"]:>5} {row["executor"]:13} {row["median_s"]:>9.2f} '
            f'{"-" if overhead is None else f"{overhead:.1f}":>9} {row["steps_per_s"]:>8.2f} '
            f'{"-" if ratio is None else f"{ratio:.2f}":>9}'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2, help='taskiq and Celery workers')
    parser.add_argument(
        '--concurrency',
        type=int,
        default=1,
        help='step slots per taskiq worker, processes per Celery worker',
    )
    parser.add_argument('--parallel-runs', type=int, default=4, help='runs of `many` at once')
    parser.add_argument('--jobs', nargs='+', default=list(bench_jobs.GRAPHS))
    parser.add_argument('--executors', nargs='+', default=list(bench_jobs.EXECUTORS))
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    workers: list[Any] = []
    os.environ[PARALLEL_STEPS_ENV] = str(args.workers * args.concurrency)
    with bench_stack() as stack:
        try:
            if 'taskiq' in args.executors:
                workers += start_taskiq_workers(stack, args.workers, args.concurrency)
            if 'celery' in args.executors:
                workers += start_celery_workers(stack, args.workers, args.concurrency)
            rows = summarise(measure(args.jobs, args.executors, args.repeat, args.parallel_runs))
        finally:
            for worker in workers:
                worker.stop()
    setup = (
        f'{machine()}; taskiq: {args.workers} workers x {args.concurrency} slots; '
        f'Celery: {args.workers} workers x {args.concurrency} processes; multiprocess and '
        'mp_forkserver: '
        f'max_concurrent {args.workers * args.concurrency}, spawn and forkserver '
        f'(preloading {", ".join(FORKSERVER_PRELOAD)}); '
        f'`many`: {MANY_RUNS} runs, {args.parallel_runs} at a time; medians of {args.repeat}'
    )
    print(f'\n{setup}')
    print_table(rows)
    if args.json:
        write_json(args.json, {'setup': setup, 'rows': rows})


if __name__ == '__main__':
    main()
