"""Failover time and kill-to-stop latency, with the default lease, grace and health check.

    .venv/bin/python bench/failover.py [--repeat 3] [--faults kill freeze partition]
        [--backlogs 0 200] [--json PATH]

Two workers (1 slot each) run the demo's `recorded_job`, whose op records in `demo_op_runs` when
each attempt's user code began, was last alive (every 0.1 s) and ended. While attempt 0 runs, its
worker gets a fault:
- kill: SIGKILL (its step process group dies with it through the lifeline);
- freeze: SIGSTOP (the step process must kill itself before the lease expires), SIGCONT after;
- partition: its link to PostgreSQL drops packets, connections left open (a fault proxy).
With a backlog of N, a `fan_out_job` run of N steps is queued first (its steps wait behind the
fault), so the retry must not queue behind them (the retry queue).
Figures, all on the database's clock (one host): failover = the fault -> the retry's user code
beginning; stopped before expiry = the lease's expiry - the moment attempt 0's user code was
dead (its last sign of life + one beat; must be > 0: no overlap); past deadline = that moment -
the worker's kill deadline (at most the expiry - 20 % of the lease). README states the worst case:
lease + grace + health-check interval.
"""

import argparse
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository
from harness import bench_stack, machine, write_json
from psycopg.rows import dict_row

from dagster_taskiq.attempts import KILL_MARGIN_FRACTION
from dagster_taskiq.defaults import DEFAULT_ABANDON_GRACE_S
from dagster_taskiq.settings import Settings
from dagster_taskiq_demo.definitions import ALIVE_INTERVAL_S, OP_RUNS_TABLE
from dagster_taskiq_demo.faultproxy import FaultProxy, Mode
from dagster_taskiq_demo.stack import WorkerProcess, spawn_worker, wait_for, wait_started

STEP = 'recorded_sleep'
HEALTH_CHECK_INTERVAL_S = 5  # the executor's default
FIRST_ATTEMPT_S = 120.0  # longer than any failover: attempt 0 only ends by the fault
RUN_CONFIG = {'ops': {STEP: {'config': {'seconds': FIRST_ATTEMPT_S, 'retry_seconds': 0.2}}}}


def rows(database_url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute(statement, params).fetchall()


def run_demo_job(name: str, run_config: dict[str, Any]) -> str:
    repository = ReconstructableRepository.for_module('dagster_taskiq_demo.definitions', 'defs')
    job = repository.get_reconstructable_job(name)
    with (
        DagsterInstance.get() as instance,
        execute_job(job, instance, run_config=run_config) as result,
    ):
        if not result.success:
            raise RuntimeError(f'{name} failed (run {result.run_id})')
        return result.run_id


def queued(database_url: str) -> int:
    [row] = rows(database_url, "SELECT count(*) AS n FROM step_executions WHERE state = 'QUEUED'")
    return int(row['n'])


def one_failover(
    database_url: str, scratch: Path, fault: str, index: int, backlog: int
) -> dict[str, float]:
    with ExitStack() as stack:
        proxies: dict[str, FaultProxy] = {}
        workers: list[WorkerProcess] = []
        for slot in range(2):
            worker_id = f'{fault}-{index}-{slot}'
            env = {}
            if fault == 'partition':
                target = urlsplit(database_url)
                proxy = stack.enter_context(FaultProxy('127.0.0.1', target.port or 5432))
                proxies[worker_id] = proxy
                env['DAGSTER_TASKIQ_DATABASE_URL'] = target._replace(  # the op's own is direct
                    netloc=f'{target.username}@127.0.0.1:{proxy.port}'
                ).geturl()
            workers.append(spawn_worker(worker_id, scratch, '--concurrency', '1', env=env))
        wait_started(workers)
        stack.callback(lambda: [worker.stop() for worker in workers])
        with ThreadPoolExecutor(2) as pool:
            outcome = pool.submit(run_demo_job, 'recorded_job', RUN_CONFIG)
            [first] = wait_for(
                lambda: rows(
                    database_url,
                    'SELECT * FROM demo_op_runs WHERE attempt = 0 AND run_id NOT IN'
                    ' (SELECT run_id FROM demo_op_runs WHERE attempt = 1)',
                ),
                timeout_s=120,
                what='attempt 0 running',
            )
            [row] = rows(
                database_url,
                "SELECT owner FROM step_executions WHERE run_id = %(run_id)s AND state = 'RUNNING'",
                run_id=first['run_id'],
            )
            [owner] = [w for w in workers if w.worker_id == row['owner']]
            backlog_run = None
            if backlog:
                width = {'ops': {'split': {'config': {'width': backlog}}}}
                backlog_run = pool.submit(run_demo_job, 'fan_out_job', width)
                wait_for(
                    lambda: queued(database_url) >= backlog * 0.75,  # a worker drains it
                    timeout_s=120,
                    what=f'a backlog of {backlog} steps',
                )
            time.sleep(2.0)  # well into the step, between two heartbeats
            if fault == 'kill':
                owner.process.send_signal(signal.SIGKILL)
            elif fault == 'freeze':
                owner.process.send_signal(signal.SIGSTOP)
                stack.callback(owner.process.send_signal, signal.SIGCONT)
            else:
                proxies[owner.worker_id].set_mode(Mode.DROP)
            [fault_at] = rows(database_url, 'SELECT clock_timestamp() AS at')
            backlog_at_fault = queued(database_url)
            run_id = outcome.result(timeout=600)
            if backlog_run is not None:
                backlog_run.result(timeout=600)
    return {**measure(database_url, run_id, fault_at['at']), 'backlog': backlog_at_fault}


def measure(database_url: str, run_id: str, fault_at: datetime) -> dict[str, float]:
    runs = rows(
        database_url,
        'SELECT * FROM demo_op_runs WHERE run_id = %(run_id)s AND step_key = %(step)s'
        ' ORDER BY attempt',
        run_id=run_id,
        step=STEP,
    )
    attempts = rows(
        database_url,
        'SELECT * FROM step_executions WHERE run_id = %(run_id)s AND step_key = %(step)s'
        ' ORDER BY attempt',
        run_id=run_id,
        step=STEP,
    )
    if [(a['attempt'], a['state']) for a in attempts] != [(0, 'ABANDONED'), (1, 'COMPLETED')]:
        raise RuntimeError(f'unexpected attempts of run {run_id}: {attempts}')
    lease_s = Settings().lease_s
    expiry = attempts[0]['lease_expires_at']
    dead_by = runs[0]['ended_at'] or runs[0]['alive_at'] + timedelta(seconds=ALIVE_INTERVAL_S)
    return {
        'failover_s': (runs[1]['begun_at'] - fault_at).total_seconds(),
        'abandoned_after_expiry_s': (attempts[0]['ended_at'] - expiry).total_seconds(),
        'stopped_before_expiry_s': (expiry - dead_by).total_seconds(),
        'past_deadline_s': (dead_by - expiry).total_seconds() + KILL_MARGIN_FRACTION * lease_s,
        'overlap_s': max(0.0, (dead_by - runs[1]['begun_at']).total_seconds()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--faults', nargs='+', default=['kill', 'freeze', 'partition'])
    parser.add_argument(
        '--backlogs', nargs='+', type=int, default=[0], help='steps queued behind the fault'
    )
    parser.add_argument('--json', type=Path)
    options = parser.parse_args()
    figures: dict[str, Any] = {'machine': machine(), 'results': {}}
    with bench_stack() as stack:
        with psycopg.connect(stack.database_url, autocommit=True) as connection:
            connection.execute(OP_RUNS_TABLE)
        settings = Settings()
        worst = settings.lease_s + DEFAULT_ABANDON_GRACE_S + HEALTH_CHECK_INTERVAL_S
        print(
            f'lease {settings.lease_s:.0f} s, grace {DEFAULT_ABANDON_GRACE_S:.0f} s, health check'
            f' {HEALTH_CHECK_INTERVAL_S} s: worst-case failover {worst:.0f} s; {machine()}'
        )
        print(
            f'{"fault":<10} {"queued":>6} {"n":>2} {"failover s":>22} {"abandoned after":>16}'
            f' {"stopped before":>15} {"past deadline":>14} {"overlap":>8}'
        )
        for fault in options.faults:
            for backlog in options.backlogs:
                samples = [
                    one_failover(stack.database_url, stack.scratch, fault, index, backlog)
                    for index in range(options.repeat)
                ]
                figures['results'][f'{fault}-{backlog}'] = samples
                print_row(fault, samples)
    if options.json:
        write_json(options.json, figures)


def print_row(fault: str, samples: list[dict[str, float]]) -> None:
    failovers = [s['failover_s'] for s in samples]
    queued_at_fault = min(int(s['backlog']) for s in samples)
    print(
        f'{fault:<10} {queued_at_fault:>6} {len(samples):>2}'
        f' {min(failovers):>6.1f}/{statistics.median(failovers):5.1f}/{max(failovers):5.1f}'
        f' (min/med/max)'
        f' {max(s["abandoned_after_expiry_s"] for s in samples):>14.1f}s'
        f' {min(s["stopped_before_expiry_s"] for s in samples):>13.1f}s'
        f' {max(s["past_deadline_s"] for s in samples):>12.2f}s'
        f' {max(s["overlap_s"] for s in samples):>7.1f}s'
    )


if __name__ == '__main__':
    main()
