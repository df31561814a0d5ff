"""What every benchmark starts: moto, a fresh database, a Dagster home, the queue, workers.

The database holds Dagster's storage and the idempotency store; taskiq workers and Celery workers
import `bench_jobs` (bench/ is put on PYTHONPATH, so every child process finds it).
"""

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, start_moto
from dagster_taskiq_demo.stack import (
    WorkerProcess,
    create_database,
    drop_database,
    spawn_worker,
    stop_process,
    wait_started,
    write_dagster_home,
)

BENCH_DIR = Path(__file__).resolve().parent
SERVER_URL = os.environ.get('DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/postgres')
CELERY_BROKER_URL = 'pyamqp://guest:guest@127.0.0.1:5672//'
CELERY_START_TIMEOUT_S = 120.0
CELERY_STOP_TIMEOUT_S = 30.0
BIN = Path(sys.executable).parent


@dataclass
class BenchStack:
    scratch: Path
    database_url: str
    moto_url: str


@contextmanager
def bench_stack() -> Iterator[BenchStack]:
    """moto, a fresh database (dropped after), a Dagster home and the step queue, in os.environ."""
    for key, value in EMULATOR_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    os.environ['PYTHONPATH'] = os.pathsep.join(
        [str(BENCH_DIR), *filter(None, [os.environ.get('PYTHONPATH')])]
    )
    database = f'bench_{uuid.uuid4().hex[:10]}'
    moto = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix='dagster-taskiq-bench-') as scratch:
            database_url = create_database(SERVER_URL, database)
            store.upgrade(database_url)
            home = write_dagster_home(Path(scratch) / 'home', database_url)
            os.environ.update(
                {
                    'DAGSTER_HOME': str(home),
                    'DATABASE_URL': database_url,
                    'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': moto.url,
                    'DAGSTER_TASKIQ_QUEUE_NAME': f'bench-{uuid.uuid4().hex[:8]}',
                    'DAGSTER_CELERY_BROKER_HOST': '127.0.0.1',
                    'DAGSTER_TASKIQ_SIGNING_KEY': secrets.token_hex(16),  # workers require one
                }
            )
            asyncio.run(bootstrap_queues(Settings()))
            yield BenchStack(Path(scratch), database_url, moto.url)
    finally:
        drop_database(SERVER_URL, database)
        moto.stop()


def start_taskiq_workers(stack: BenchStack, count: int, concurrency: int) -> list[WorkerProcess]:
    workers = [
        spawn_worker(
            f'bench-worker-{index}',
            stack.scratch,
            '--concurrency',
            str(concurrency),
            preload=('bench_jobs',),
        )
        for index in range(count)
    ]
    wait_started(workers)
    return workers


@dataclass
class CeleryWorker:
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        stop_process(self.process, CELERY_STOP_TIMEOUT_S)  # SIGTERM: Celery's warm shutdown


def start_celery_workers(stack: BenchStack, count: int, concurrency: int = 1) -> list[CeleryWorker]:
    """`count` Celery workers of `concurrency` processes each on dagster-celery's queue (purged
    first)."""
    celery = [str(BIN / 'celery'), '-A', 'dagster_celery.app']
    subprocess.run(
        [*celery, 'purge', '-f', '-Q', 'dagster'], check=True, capture_output=True, timeout=60
    )
    workers = []
    for index in range(count):
        log_path = stack.scratch / f'celery-{index}.log'
        with log_path.open('wb') as log_file:
            process = subprocess.Popen(
                [
                    *celery,
                    'worker',
                    '--queues',
                    'dagster',
                    '--concurrency',
                    str(concurrency),
                    '--hostname',
                    f'bench-celery-{index}@%h',
                    '--include',
                    'bench_jobs',
                    '--without-gossip',
                    '--without-mingle',
                    '--loglevel',
                    'INFO',
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        workers.append(CeleryWorker(process, log_path))
    deadline = time.monotonic() + CELERY_START_TIMEOUT_S
    for worker in workers:
        while ' ready.' not in worker.log_path.read_text():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'Celery worker did not start:\n{worker.log_path.read_text()}')
            time.sleep(0.1)
    return workers


def repository() -> ReconstructableRepository:
    return ReconstructableRepository.for_module('bench_jobs', 'defs', str(BENCH_DIR))


def timed_run(job: str, run_config: dict[str, Any]) -> tuple[float, str]:
    """Execute `job` in this process; its wall time and run id. Raises if the run failed."""
    with DagsterInstance.get() as instance:
        started = time.perf_counter()
        with execute_job(
            repository().get_reconstructable_job(job), instance, run_config=run_config
        ) as result:
            elapsed = time.perf_counter() - started
            if not result.success:
                raise RuntimeError(f'{job} failed (run {result.run_id})')
            return elapsed, result.run_id


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 (inclusive method: exact for the few hundred samples we take)."""
    cuts = statistics.quantiles(values, n=100, method='inclusive')
    return {'p50': cuts[49], 'p95': cuts[94], 'p99': cuts[98]}


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))


def machine() -> str:
    return f'{os.cpu_count()} cores, Python {sys.version.split()[0]}'
