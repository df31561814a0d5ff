"""How the time per step grows with the queue's depth and with the number of runs at once.

    .venv/bin/python bench/scale.py [--depths 100 1000] [--runs 1 10 50] [--workers 2]
        [--concurrency 2] [--json PATH]

- Depth: N steps queued at once: N/100 runs of `noop_100` (100 independent no-op steps, whose
  executor enqueues all of them at once) submitted together, so the job (and its plan) stays the
  same size and only the queue grows.
- Runs at once: R runs of `many` (10 independent 10 ms steps each) submitted together.
Each run has a run process of its own, from a pool of as many (started and warmed first, as a run
launcher would have them). `--workers` x `--concurrency` drain the queue. Per scenario: wall time
per step (the scenario's wall over its steps), each step's service time (claim -> finish: what a
worker spends on it; a per-step cost that grew with the depth or the runs would show here) and its
wait (enqueue -> claim: the queue), from the store's clock; or the error that ended it.
Under moto, a send costs O(queue depth) (~24 sends/s at depth 1,000): the enqueue column (first to
last enqueue) shows that emulator cost, which SQS does not have.
"""

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dispatch import step_times
from harness import bench_stack, machine, start_taskiq_workers, timed_run, write_json

DEPTH_JOB_WIDTH = 100  # the depth scenarios' job: noop_100


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


def scenario_row(name: str, database_url: str, job: str, runs: int) -> dict[str, Any]:
    try:
        with ProcessPoolExecutor(runs, mp_context=get_context('forkserver')) as pool:
            list(pool.map(warm, range(runs)))
            started = time.perf_counter()
            results = list(pool.map(timed_run, [job] * runs, [{}] * runs))
            wall_s = time.perf_counter() - started
    except Exception as error:  # noqa: BLE001 - reported in the table: it is the finding
        return {'scenario': name, 'error': f'{type(error).__name__}: {error}'[:200]}
    return summarise(name, database_url, [result[1] for result in results], wall_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depths', type=int, nargs='+', default=[100, 1000])
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
            scenarios = [
                (f'depth {depth}', f'noop_{DEPTH_JOB_WIDTH}__taskiq', depth // DEPTH_JOB_WIDTH)
                for depth in args.depths
            ] + [(f'{runs} runs at once', 'many__taskiq', runs) for runs in args.runs]
            for name, job, runs in scenarios:
                rows.append(scenario_row(name, stack.database_url, job, runs))
                print(rows[-1], flush=True)
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
        if 'error' in row:
            print(f'{row["scenario"]:18} failed: {row["error"]}')
            continue
        print(
            f'{row["scenario"]:18} {row["steps"]:>6} {row["wall_s"]:>7.2f} '
            f'{row["ms_per_step"]:>8.1f} {row["enqueue_span_s"]:>10.2f} '
            f'{row["wait_p50_ms"]:>12.1f} {row["service_p50_ms"]:>15.1f}'
        )
    if args.json:
        write_json(args.json, {'setup': setup, 'rows': rows})


if __name__ == '__main__':
    main()
