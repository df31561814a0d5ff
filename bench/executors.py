"""The same jobs on Dagster's executors and on taskiq_executor, side by side in one invocation.

    .venv/bin/python bench/executors.py [--repeat 3] [--workers 2] [--concurrency 2] [--json PATH]

Starts its own moto server, a fresh PostgreSQL database (Dagster storage and the idempotency
store), a Dagster home and the taskiq workers; runs each job `--repeat` times, interleaved, and
prints medians: wall time per run, per-step overhead over in_process, steps per second, and each
executor's time as a ratio to taskiq's.
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from dagster_taskiq import store
from dagster_taskiq.cli import bootstrap_queues
from dagster_taskiq.settings import Settings
from dagster_taskiq_demo import benchmark_jobs
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, start_moto
from dagster_taskiq_demo.stack import (
    create_database,
    drop_database,
    spawn_worker,
    wait_started,
    write_dagster_home,
)

SERVER_URL = os.environ.get('DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/postgres')
STEPS = {'chain': benchmark_jobs.CHAIN_LENGTH, 'fan_out': benchmark_jobs.FAN_OUT_WIDTH + 2}
RUN_CONFIG: dict[str, dict[str, Any]] = {
    'in_process': {},
    'multiprocess': {'execution': {'config': {'max_concurrent': 2}}},
    'taskiq': {},
}


def timed_run(repository: ReconstructableRepository, job: str, executor: str) -> float:
    with DagsterInstance.get() as instance:
        started = time.perf_counter()
        with execute_job(
            repository.get_reconstructable_job(job), instance, run_config=RUN_CONFIG[executor]
        ) as result:
            elapsed = time.perf_counter() - started
            if not result.success:
                raise RuntimeError(f'{job} failed (run {result.run_id})')
    return elapsed


def measure(repeat: int) -> dict[str, dict[str, list[float]]]:
    repository = ReconstructableRepository.for_module(benchmark_jobs.__name__, 'defs', os.getcwd())
    times: dict[str, dict[str, list[float]]] = {
        graph: {executor: [] for executor in benchmark_jobs.EXECUTORS} for graph in STEPS
    }
    for repetition in range(repeat):
        for graph in STEPS:
            for executor in benchmark_jobs.EXECUTORS:
                seconds = timed_run(repository, f'{graph}__{executor}', executor)
                times[graph][executor].append(seconds)
                print(f'  run {repetition + 1}/{repeat} {graph:8} {executor:12} {seconds:7.2f} s')
    return times


def summarise(times: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for graph, by_executor in times.items():
        medians = {executor: statistics.median(runs) for executor, runs in by_executor.items()}
        for executor, median_s in medians.items():
            rows.append(
                {
                    'job': graph,
                    'steps': STEPS[graph],
                    'executor': executor,
                    'median_s': round(median_s, 3),
                    'runs_s': [round(s, 3) for s in by_executor[executor]],
                    'overhead_per_step_ms': round(
                        (median_s - medians['in_process']) / STEPS[graph] * 1000, 1
                    ),
                    'steps_per_s': round(STEPS[graph] / median_s, 2),
                    'ratio_to_taskiq': round(median_s / medians['taskiq'], 2),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f'{"job":8} {"steps":>5} {"executor":12} {"median s":>9} {"+ms/step":>9} '
    print(header + f'{"steps/s":>8} {"x taskiq":>9}')
    for row in rows:
        print(
            f'{row["job"]:8} {row["steps"]:>5} {row["executor"]:12} {row["median_s"]:>9.2f} '
            f'{row["overhead_per_step_ms"]:>9.1f} {row["steps_per_s"]:>8.2f} '
            f'{row["ratio_to_taskiq"]:>9.2f}'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--concurrency', type=int, default=2, help='step slots per worker')
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    os.environ.update({k: os.environ.get(k, v) for k, v in EMULATOR_CREDENTIALS.items()})
    database = f'bench_{uuid.uuid4().hex[:10]}'
    moto = start_moto()
    workers = []
    try:
        with tempfile.TemporaryDirectory(prefix='dagster-taskiq-bench-') as scratch:
            database_url = create_database(SERVER_URL, database)
            store.upgrade(database_url)
            os.environ.update(
                {
                    'DAGSTER_HOME': str(write_dagster_home(Path(scratch) / 'home', database_url)),
                    'DATABASE_URL': database_url,
                    'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': moto.url,
                    'DAGSTER_TASKIQ_QUEUE_NAME': f'bench-{uuid.uuid4().hex[:8]}',
                }
            )
            asyncio.run(bootstrap_queues(Settings()))
            workers = [
                spawn_worker(
                    f'bench-worker-{index}',
                    Path(scratch),
                    '--concurrency',
                    str(args.concurrency),
                    preload=(benchmark_jobs.__name__,),
                )
                for index in range(args.workers)
            ]
            wait_started(workers)
            rows = summarise(measure(args.repeat))
    finally:
        for worker in workers:
            worker.stop()
        drop_database(SERVER_URL, database)
        moto.stop()
    print(f'\n{args.workers} taskiq workers x {args.concurrency} slots; medians of {args.repeat}')
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({'workers': args.workers, 'rows': rows}, indent=2))


if __name__ == '__main__':
    main()
