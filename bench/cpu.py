"""Where the CPU goes while a job runs: CPU seconds per component, taskiq against in_process.

    .venv/bin/python bench/cpu.py [--jobs fan_out chain] [--workers 2] [--concurrency 2]
        [--repeat 3] [--json PATH]

For each job, one warm-up run per executor, then `--repeat` runs: the CPU time (user + system)
each component used during the run, read from /proc before and after it (a process's own time
plus that of its children it has reaped: the forkserver reaps the step processes, PostgreSQL's
postmaster its backends). Components: the run worker (this process), the taskiq workers' main
processes, their step processes (with the forkserver), PostgreSQL, moto. With 2 cores, a run
can take no less than its total CPU seconds / 2: the floor the parallel executors are up against.
"""

import argparse
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from harness import bench_stack, machine, start_taskiq_workers, timed_run, write_json

TICKS_PER_S = os.sysconf('SC_CLK_TCK')


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command, parent pid, CPU seconds with reaped children) of a process, None if gone."""
    try:
        text = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    command = text[text.index('(') + 1 : text.rindex(')')]
    fields = text.rsplit(')', 1)[1].split()
    # after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based here
    ticks = sum(int(fields[index]) for index in (11, 12, 13, 14))
    return command, int(fields[1]), ticks / TICKS_PER_S


def _cmdline(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode()
    except OSError:
        return ''


def component_cpu(worker_pids: set[int]) -> Counter[str]:
    """CPU seconds so far of each component, over every live process."""
    stats = {
        int(e.name): s
        for e in Path('/proc').iterdir()
        if e.name.isdigit()
        if (s := _stat(int(e.name)))
    }
    found: Counter[str] = Counter()
    for pid, (command, parent, seconds) in stats.items():
        if pid == os.getpid():
            name = 'run worker (executor)'
        elif pid in worker_pids:
            name = 'taskiq worker main'
        elif parent in worker_pids or stats.get(parent, ('', 0, 0))[1] in worker_pids:
            name = 'step processes (forkserver)'
        elif command.startswith('postgres'):
            name = 'postgresql'
        elif 'moto' in _cmdline(pid):
            name = 'moto (SQS)'
        else:
            continue
        found[name] += seconds
    return found


def measure(job: str, executor: str, worker_pids: set[int], repeat: int) -> dict[str, Any]:
    timed_run(f'{job}__{executor}', {})  # warm-up
    walls, usage = [], []
    for _ in range(repeat):
        before = component_cpu(worker_pids)
        wall_s, _ = timed_run(f'{job}__{executor}', {})
        after = component_cpu(worker_pids)
        walls.append(wall_s)
        usage.append({name: after[name] - before.get(name, 0.0) for name in after})
    names = sorted({name for used in usage for name in used})
    cpu = {name: round(statistics.median(u.get(name, 0.0) for u in usage), 2) for name in names}
    return {
        'job': job,
        'executor': executor,
        'wall_s': round(statistics.median(walls), 2),
        'cpu_s': cpu,
        'cpu_total_s': round(sum(cpu.values()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--jobs', nargs='+', default=['fan_out', 'chain'])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--concurrency', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--json', type=Path, help='write the figures here')
    args = parser.parse_args()

    rows = []
    with bench_stack() as stack:
        workers = start_taskiq_workers(stack, args.workers, args.concurrency)
        worker_pids = {worker.process.pid for worker in workers}
        try:
            for job in args.jobs:
                for executor in ('in_process', 'taskiq'):
                    rows.append(measure(job, executor, worker_pids, args.repeat))
        finally:
            for worker in workers:
                worker.stop()
    setup = (
        f'{machine()}; taskiq: {args.workers} workers x {args.concurrency} slots; '
        f'medians of {args.repeat}'
    )
    names = sorted({name for row in rows for name in row['cpu_s']})
    print(f'\n{setup}; CPU seconds per component during one run')
    print(f'{"job":8} {"executor":10} {"wall s":>7} {"CPU s":>6}  ' + '  '.join(names))
    for row in rows:
        print(
            f'{row["job"]:8} {row["executor"]:10} {row["wall_s"]:>7.2f} '
            f'{row["cpu_total_s"]:>6.2f}  '
            + '  '.join(f'{row["cpu_s"].get(name, 0.0):>{len(name)}.2f}' for name in names)
        )
    if args.json:
        write_json(args.json, {'setup': setup, 'rows': rows})


if __name__ == '__main__':
    main()
