"""How fast a step gets from the executor to a worker, against the raw SQS floor.

    .venv/bin/python bench/dispatch.py [--samples 40] [--concurrency 1 2 4 8] [--json PATH]

- SQS floor: send -> receive of one message on the emulator, a receiver long-polling, no Dagster.
- Idle: `--samples` runs of a one-step no-op job, one after another, on one idle worker:
  enqueue -> claim (the worker starts the attempt in the store) and enqueue -> Dagster's
  STEP_START (the step's code is about to run).
- Backlog and throughput: one run of 60 independent no-op steps (all enqueued at once) on one
  worker with `--concurrency` slots, for each value: enqueue -> claim percentiles (mostly queue
  wait) and steps per second from the first claim to the last finish.
Times of enqueue, claim and finish are the database's clock (step_executions); STEP_START is
Dagster's event timestamp, on the same machine.
"""

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import bench_jobs
import psycopg
from dagster import DagsterEventType, DagsterInstance
from harness import (
    bench_stack,
    machine,
    percentiles,
    start_taskiq_workers,
    timed_run,
    write_json,
)

from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import open_queue

SQS_GAP_S = 0.05  # between floor samples, so each finds an idle receiver


async def sqs_floor(samples: int) -> list[float]:
    """Seconds from the start of a send to its receipt by a long-polling receiver."""
    latencies: list[float] = []
    async with open_queue(Settings()) as queue:

        async def receive_all() -> None:
            while len(latencies) < samples:
                for item in await queue.receive(1, wait_s=20):
                    latencies.append(time.perf_counter() - float(item.body))
                    await queue.delete(item)

        receiver = asyncio.create_task(receive_all())
        for _ in range(samples):
            await asyncio.sleep(SQS_GAP_S)
            await queue.send(repr(time.perf_counter()), {})
        await asyncio.wait_for(receiver, timeout=60)
    return latencies


def step_times(database_url: str, run_id: str) -> list[tuple[str, float, float, float]]:
    """(step_key, enqueued, claimed, ended) epoch seconds of each step of the run."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            'SELECT step_key, extract(epoch FROM enqueued_at), extract(epoch FROM started_at),'
            ' extract(epoch FROM ended_at) FROM step_executions WHERE run_id = %s',
            (run_id,),
        ).fetchall()
    return [
        (key, float(enqueued), float(claimed), float(ended))
        for key, enqueued, claimed, ended in rows
    ]


def step_starts(run_id: str) -> dict[str, float]:
    with DagsterInstance.get() as instance:
        records = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
    return {record.step_key: record.timestamp for record in records if record.step_key}


def idle_latencies(database_url: str, samples: int) -> tuple[list[float], list[float]]:
    to_claim, to_step_start = [], []
    for _ in range(samples):
        run_id = timed_run('noop_one__taskiq', {})[1]
        starts = step_starts(run_id)
        for key, enqueued, claimed, _ended in step_times(database_url, run_id):
            to_claim.append(claimed - enqueued)
            to_step_start.append(starts[key] - enqueued)
    return to_claim, to_step_start


def backlog(database_url: str) -> tuple[list[float], float]:
    """Enqueue -> claim of every step of one wide run, and the run's steps per second."""
    run_id = timed_run('noop_wide__taskiq', {})[1]
    times = step_times(database_url, run_id)
    busy_s = max(ended for *_, ended in times) - min(claimed for _, _, claimed, _ in times)
    return [claimed - enqueued for _, enqueued, claimed, _ in times], len(times) / busy_s


def ms(stats: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds * 1000, 1) for name, seconds in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=40)
    parser.add_argument('--concurrency', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    latency_rows: list[dict[str, Any]] = []
    throughput_rows: list[dict[str, Any]] = []
    with bench_stack() as stack:
        floor = asyncio.run(sqs_floor(args.samples))
        latency_rows.append(
            {'scenario': 'SQS floor: send -> receive', 'n': len(floor), **ms(percentiles(floor))}
        )
        workers = start_taskiq_workers(stack, 1, 1)
        try:
            timed_run('noop_one__taskiq', {})  # warm the run path once
            to_claim, to_step_start = idle_latencies(stack.database_url, args.samples)
        finally:
            workers[0].stop()
        latency_rows += [
            {'scenario': 'idle: enqueue -> claim', 'n': len(to_claim), **ms(percentiles(to_claim))},
            {
                'scenario': 'idle: enqueue -> STEP_START',
                'n': len(to_step_start),
                **ms(percentiles(to_step_start)),
            },
        ]
        for concurrency in args.concurrency:
            workers = start_taskiq_workers(stack, 1, concurrency)
            try:
                waits, steps_per_s = backlog(stack.database_url)
            finally:
                workers[0].stop()
            latency_rows.append(
                {
                    'scenario': f'backlog {bench_jobs.NOOP_WIDTH}, {concurrency} slots: '
                    'enqueue -> claim',
                    'n': len(waits),
                    **ms(percentiles(waits)),
                }
            )
            throughput_rows.append(
                {'concurrency': concurrency, 'steps_per_s': round(steps_per_s, 2)}
            )
    base = throughput_rows[0]['steps_per_s']
    for row in throughput_rows:
        row['ratio_to_first'] = round(row['steps_per_s'] / base, 2)
    overhead_ms = latency_rows[1]['p50'] - latency_rows[0]['p50']

    print(f'\n{machine()}; one worker; {args.samples} idle samples')
    print(f'{"scenario":48} {"n":>4} {"p50 ms":>8} {"p95 ms":>8} {"p99 ms":>8}')
    for row in latency_rows:
        print(
            f'{row["scenario"]:48} {row["n"]:>4} '
            f'{row["p50"]:>8.1f} {row["p95"]:>8.1f} {row["p99"]:>8.1f}'
        )
    print(f'idle enqueue -> claim p50 is {overhead_ms:.1f} ms above the SQS floor p50')
    print(f'\n{"slots":>5} {"steps/s":>8} {"x first":>8}')
    for row in throughput_rows:
        print(f'{row["concurrency"]:>5} {row["steps_per_s"]:>8.2f} {row["ratio_to_first"]:>8.2f}')
    if args.json:
        write_json(
            args.json,
            {
                'machine': machine(),
                'latency': latency_rows,
                'p50_above_floor_ms': round(overhead_ms, 1),
                'throughput': throughput_rows,
            },
        )


if __name__ == '__main__':
    main()
