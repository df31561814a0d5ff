"""How the time per step grows with the queue's depth and with the number of runs at once.

    .venv/bin/python bench/scale.py [--depths 100 1000] [--runs 1 10 50] [--workers 2]
        [--concurrency 2] [--json PATH]

- Depth: one run of N independent no-op steps (`noop_<N>`): its executor enqueues all N at once,
  so the queue holds up to N; `--workers` x `--concurrency` drain it.
- Runs at once: R runs of `many` (10 independent 10 ms steps each) submitted together, each from a
  run process of its own (a pool of R, started and warmed first, as a run launcher would have them).
Per scenario: wall time per step (the whole scenario's wall over its steps), each step's service
time (claim -> finish: what a worker spends on it; a per-step cost that grew with the depth or the
runs would show here) and its wait (enqueue -> claim: the queue). Times of the store's clock.
Under moto, a send costs O(queue depth) (~24 sends/s at depth 1,000): the enqueue column shows
how long the executor took to send them all, which is the emulator's cost, not SQS's.
"""

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import bench_jobs
from dispatch import step_times
from harness import bench_stack, machine, start_taskiq_workers, timed_run, write_json

MANY_STEPS = bench_jobs.STEPS['many']


def warm(_: int) -> None:
    """Make a pool process import what a run needs, before the clock starts."""
    time.sleep(0.5)  # every process of the pool gets one: none is idle


def summarise(
    scenario: str, database_url: str, run_ids: list[str], wall_s: float
) -> dict[str, Any]:
    times = [t for run_id in run_ids for t in step_times(database_url, run_id)]
    enqueued = [t[1] for t in times]
    return {
        'scenario': scenario,
        'steps': len(times),
        'wall_s': round(wall_s, 2),
        'ms_per_step': round(wall_s / len(times) * 1000, 1),
        'enqueue_span_s': round(max(enqueued) - min(enqueued), 2),
        'wait_p50_ms': round(statistics.median(c - e for _, e, c, _ in times) * 1000, 1),
        'service_p50_ms': round(statistics.median(f - c for _, _, c, f in times) * 1000, 1),
    }


def depth_row(database_url: str, depth: int) -> dict[str, Any]:
    wall_s, run_id = timed_run(f'noop_{depth}__taskiq', {})
    return summarise(f'depth {depth}', database_url, [run_id], wall_s)


def runs_row(database_url: str, runs: int) -> dict[str, Any]:
    with ProcessPoolExecutor(runs, mp_context=get_context('forkserver')) as pool:
        list(pool.map(warm, range(runs)))
        started = time.perf_counter()
        results = list(pool.map(timed_run, ['many__taskiq'] * runs, [{}] * runs))
        wall_s = time.perf_counter() - started
    return summarise(f'{runs} runs at once', database_url, [r[1] for r in results], wall_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depths', type=int, nargs='+', default=list(bench_jobs.NOOP_DEPTHS))
    parser.add_argument('--runs', type=int, nargs='+', default=[1, 10, 50])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--concurrency', type=int, default=2)
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    rows = []
    with bench_stack() as stack:
        workers = start_taskiq_workers(stack, args.workers, args.concurrency)
        try:
            timed_run('noop_one__taskiq', {})  # warm the run path once
            for depth in args.depths:
                rows.append(depth_row(stack.database_url, depth))
                print(rows[-1])
            for runs in args.runs:
                rows.append(runs_row(stack.database_url, runs))
                print(rows[-1])
        finally:
            for worker in workers:
                worker.stop()
    setup = f'{machine()}; taskiq: {args.workers} workers x {args.concurrency} slots'
    print(f'\n{setup}')
    print(
        f'{"scenario":18} {"steps":>6} {"wall s":>7} {"ms/step":>8} {"enqueue s":>10} '
        f'{"wait p50 ms":>12} {"service p50 ms":>15}'
    )
    for row in rows:
        print(
            f'{row["scenario"]:18} {row["steps"]:>6} {row["wall_s"]:>7.2f} '
            f'{row["ms_per_step"]:>8.1f} {row["enqueue_span_s"]:>10.2f} '
            f'{row["wait_p50_ms"]:>12.1f} {row["service_p50_ms"]:>15.1f}'
        )
    if args.json:
        write_json(args.json, {'setup': setup, 'rows': rows})


if __name__ == '__main__':
    main()
