"""Memory of a taskiq worker (idle, and running 4 steps) and of the run process, against peers.

    .venv/bin/python bench/memory.py [--json PATH]

For a process tree (the worker, its forkserver, its step processes) it reports the RSS of the
main process and the tree's PSS (proportional set size: pages shared after a fork counted once
across the processes that share them, so the tree's PSS is what it really takes); for the run
process, its peak RSS. Baselines measured in the same go: a bare `python -c 'import dagster'`,
an idle dagster-celery worker, and the run process of the same job on the in_process executor.
"4 steps running" is sampled once the worker's tree holds its idle processes plus 4 step processes
and the run has logged 4 STEP_START; by then the worker has also started the next step's process
(a spare, waiting for its step), which the sample includes. A process that exits while sampled
counts 0.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import bench_jobs
from dagster import DagsterEventType, DagsterInstance, RunsFilter
from harness import (
    bench_stack,
    machine,
    start_celery_workers,
    start_taskiq_workers,
    timed_run,
    write_json,
)

from dagster_taskiq_demo.stack import wait_for

SETTLE_S = 2.0  # after start-up, before an idle sample
STEPS_TIMEOUT_S = 60.0


def _status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status figure in kB; 0 for a process that has just exited (a zombie)."""
    try:
        lines = Path(f'/proc/{pid}/status').read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f'{field}:'):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    try:
        lines = Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith('Pss:'):
            return int(line.split()[1])
    return 0


def _parents() -> dict[int, int]:
    """The parent of every process."""
    parents: dict[int, int] = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                # the field after the parenthesised command: state, then ppid
                stat = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    return parents


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    parents = _parents()
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def tree_sample(pid: int) -> dict[str, Any]:
    pids = descendants(pid)
    return {
        'processes': len(pids),
        'main_rss_mb': round(_status_kb(pid, 'VmRSS') / 1024, 1),
        'tree_pss_mb': round(sum(_pss_kb(p) for p in pids) / 1024, 1),
        'tree_rss_mb': round(sum(_status_kb(p, 'VmRSS') for p in pids) / 1024, 1),
    }


def bare_dagster() -> dict[str, Any]:
    process = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, dagster; print("ready", flush=True); sys.stdin.read()',
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdin is not None
    process.stdout.readline()
    sample = tree_sample(process.pid)
    process.stdin.close()
    process.wait()
    return sample


def step_processes(idle: set[int]) -> list[int]:
    """Processes started by those of the idle worker tree (the forkserver's step processes)."""
    return [child for child, parent in _parents().items() if parent in idle and child not in idle]


def steps_started(instance: DagsterInstance, job: str) -> int:
    runs = instance.get_runs(RunsFilter(job_name=job))
    return sum(len(instance.all_logs(r.run_id, of_type=DagsterEventType.STEP_START)) for r in runs)


def steps_running(idle: set[int], count: int, job: str, run: Future[Any]) -> None:
    """Wait until the worker tree holds `count` step processes besides its `idle` processes and
    the run of `job` has logged `count` STEP_START (each step is in its op). Raises otherwise."""
    seen = (0, 0)

    with DagsterInstance.get() as instance:

        def running() -> bool:
            nonlocal seen
            if run.done():
                run.result()  # raises if the run failed
                raise RuntimeError(f'{job} ended before {count} of its steps ran at once')
            steps = len(step_processes(idle))  # the running steps, and the next step's spare
            seen = (steps, steps_started(instance, job) if steps >= count else 0)
            return seen[0] >= count and seen[1] == count

        try:
            wait_for(running, STEPS_TIMEOUT_S, f'{count} step processes and STEP_START of {job}')
        except TimeoutError as error:
            raise TimeoutError(
                f'{error}: the worker tree holds {seen[0]} step processes besides its idle '
                f'{len(idle)}, and {job} has {seen[1]} STEP_START'
            ) from error


def run_peak_rss(job: str) -> float:
    """Run `job` in this (fresh) process; its peak RSS in MB."""
    timed_run(job, {})
    return round(_status_kb(os.getpid(), 'VmHWM') / 1024, 1)


def peak_in_fresh_process(job: str) -> float:
    with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as pool:
        return pool.submit(run_peak_rss, job).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    rows: list[dict[str, Any]] = [{'what': "python -c 'import dagster'", **bare_dagster()}]
    with bench_stack() as stack:
        celery = start_celery_workers(stack, 1)[0]
        try:
            time.sleep(SETTLE_S)
            rows.append({'what': 'dagster-celery worker, idle', **tree_sample(celery.process.pid)})
        finally:
            celery.stop()
        worker = start_taskiq_workers(stack, 1, bench_jobs.MEMORY_STEPS)[0]
        try:
            time.sleep(SETTLE_S)
            rows.append({'what': 'taskiq worker, idle', **tree_sample(worker.process.pid)})
            idle = set(descendants(worker.process.pid))
            with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as pool:
                run = pool.submit(timed_run, 'sleepy__taskiq', {})
                steps_running(idle, bench_jobs.MEMORY_STEPS, 'sleepy__taskiq', run)
                sample = tree_sample(worker.process.pid)
                if len(step_processes(idle)) < bench_jobs.MEMORY_STEPS:
                    raise RuntimeError('a step process ended while the tree was sampled')
                rows.append(
                    {'what': f'taskiq worker, {bench_jobs.MEMORY_STEPS} steps running', **sample}
                )
                run.result()
            run_rows = [
                {
                    'what': f'run process, fan_out on {executor}',
                    'peak_rss_mb': peak_in_fresh_process(f'fan_out__{executor}'),
                }
                for executor in ('in_process', 'taskiq')
            ]
        finally:
            worker.stop()

    print(f'\n{machine()}')
    print(
        f'{"process tree":36} {"procs":>5} {"main RSS MB":>12} '
        f'{"tree PSS MB":>12} {"tree RSS MB":>12}'
    )
    for row in rows:
        print(
            f'{row["what"]:36} {row["processes"]:>5} {row["main_rss_mb"]:>12.1f} '
            f'{row["tree_pss_mb"]:>12.1f} {row["tree_rss_mb"]:>12.1f}'
        )
    in_process = run_rows[0]['peak_rss_mb']
    print(f'\n{"run process":36} {"peak RSS MB":>12} {"x in_process":>12}')
    for row in run_rows:
        row['ratio_to_in_process'] = round(row['peak_rss_mb'] / in_process, 2)
        print(f'{row["what"]:36} {row["peak_rss_mb"]:>12.1f} {row["ratio_to_in_process"]:>12.2f}')
    if args.json:
        write_json(args.json, {'machine': machine(), 'processes': rows, 'runs': run_rows})


if __name__ == '__main__':
    main()
