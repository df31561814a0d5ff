"""Where a step's time goes on taskiq: the phases of each step of the 20-op chain.

    .venv/bin/python bench/step_phases.py [--repeat 3] [--json PATH]

Runs chain__taskiq (one worker, one slot) `--repeat` times after a warm-up run and prints the
median of each phase over all steps: the run worker noticing the previous step's success and
enqueueing the next (executor), SQS and the worker's claim, the step process starting up to
Dagster's STEP_START, the step itself (STEP_START -> STEP_SUCCESS, event writes included), and
the step process ending after its success (not on the chain's critical path). Store times are
the database's clock, Dagster's event times the run's; both on this machine.
"""

import argparse
import statistics
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance
from dispatch import step_times
from harness import bench_stack, machine, start_taskiq_workers, timed_run, write_json

PHASES = (
    'previous STEP_SUCCESS -> enqueued',
    'enqueued -> claimed',
    'claimed -> STEP_START',
    'STEP_START -> STEP_SUCCESS',
    'STEP_SUCCESS -> attempt finished',
)


def phases(database_url: str, run_id: str) -> dict[str, list[float]]:
    with DagsterInstance.get() as instance:
        records = instance.all_logs(
            run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
        )
    events = {
        (r.step_key, r.dagster_event.event_type): r.timestamp for r in records if r.dagster_event
    }
    found: dict[str, list[float]] = {phase: [] for phase in PHASES}
    previous_success = None
    for key, enqueued, claimed, ended in sorted(
        step_times(database_url, run_id), key=lambda t: t[1]
    ):
        start = events[(key, DagsterEventType.STEP_START)]
        success = events[(key, DagsterEventType.STEP_SUCCESS)]
        if previous_success is not None:
            found[PHASES[0]].append(enqueued - previous_success)
        found[PHASES[1]].append(claimed - enqueued)
        found[PHASES[2]].append(start - claimed)
        found[PHASES[3]].append(success - start)
        found[PHASES[4]].append(ended - success)
        previous_success = success
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    all_phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    walls = []
    with bench_stack() as stack:
        worker = start_taskiq_workers(stack, 1, 1)[0]
        try:
            timed_run('chain__taskiq', {})  # warm-up
            for _ in range(args.repeat):
                wall_s, run_id = timed_run('chain__taskiq', {})
                walls.append(wall_s)
                for phase, values in phases(stack.database_url, run_id).items():
                    all_phases[phase] += values
        finally:
            worker.stop()
    rows = [
        {'phase': phase, 'median_ms': round(statistics.median(values) * 1000, 1), 'n': len(values)}
        for phase, values in all_phases.items()
    ]
    median_s = statistics.median(walls)
    print(f'\n{machine()}; chain__taskiq, 1 worker x 1 slot; median run {median_s:.2f} s')
    print(f'{"phase":36} {"n":>4} {"median ms":>10}')
    for row in rows:
        print(f'{row["phase"]:36} {row["n"]:>4} {row["median_ms"]:>10.1f}')
    if args.json:
        write_json(args.json, {'machine': machine(), 'runs_s': walls, 'phases': rows})


if __name__ == '__main__':
    main()
