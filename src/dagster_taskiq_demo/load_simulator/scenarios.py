"""Load scenarios against the running local stack (`dagster-taskiq-demo up`).

A scenario is a plan, made up front from its seed: runs to submit (when, which demo job, with
which config) and faults to inject (when, which kind). `run_scenario` carries the plan out through
Dagster's GraphQL API and on the stack's real workers, records every submission and fault in the
database (records.py), shows live progress, then waits (bounded) for its runs to end.
"""

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dagster_taskiq.settings import Settings
from dagster_taskiq.store import sync_engine
from dagster_taskiq_demo.load_simulator.records import (
    ensure_tables,
    fault_ended,
    record_fault,
    record_submission,
)
from dagster_taskiq_demo.local_stack import STACK_FILE
from dagster_taskiq_demo.operations import Target, ecs_status, find_target, queue_depth
from dagster_taskiq_demo.runs import ENDED, graphql_client, submit

# The demo jobs a scenario draws from, with the run config that keeps each one short.
JobChoice = tuple[str, dict[str, Any]]
FAST: JobChoice = ('fast_job', {})
SLOW: JobChoice = ('slow_job', {'ops': {'sleep_then_return': {'config': {'seconds': 3.0}}}})
FAN_OUT: JobChoice = ('fan_out_job', {'ops': {'square': {'config': {'seconds': 0.5}}}})
FAILING: JobChoice = ('failing_job', {})
FLAKY: JobChoice = ('flaky_job', {})
CRASHING: JobChoice = ('crashing_job', {})
EFFECTS: JobChoice = ('side_effect_job', {})
RECORDED: JobChoice = ('recorded_job', {'ops': {'recorded_sleep': {'config': {'seconds': 8.0}}}})
STEADY_MIX = [FAST, SLOW, EFFECTS, RECORDED]
MIXED = [FAST, SLOW, FAN_OUT, FAILING, FLAKY, CRASHING, EFFECTS, RECORDED]
FAULTY_MIX = [RECORDED, RECORDED, EFFECTS, SLOW]  # long enough steps for a kill to land mid-step
REFRESH_S = 1.0
WAIT_TIMEOUT_S = 600.0  # after the last submission, how long its runs may take to end
FREEZE_PAST_LEASE_S = 5.0  # a frozen worker stays stopped this long past its lease


@dataclass(frozen=True)
class Submission:
    at_s: float  # from the scenario's start
    job: JobChoice


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str  # 'kill' (SIGKILL a worker running a step) or 'freeze' (SIGSTOP past its lease)


@dataclass(frozen=True)
class Plan:
    name: str
    duration_s: float
    submissions: list[Submission]
    faults: list[Fault] = field(default_factory=list)


def steady_plan(rng: random.Random, jobs_per_minute: float, duration_s: float) -> Plan:
    gap_s = 60.0 / jobs_per_minute
    count = max(1, int(duration_s / gap_s))
    return Plan(
        'steady-load',
        duration_s,
        [Submission(i * gap_s, rng.choice(STEADY_MIX)) for i in range(count)],
    )


def burst_plan(
    rng: random.Random, burst_size: int, burst_interval_min: float, duration_s: float
) -> Plan:
    starts = _every(burst_interval_min * 60.0, duration_s)
    return Plan(
        'burst-load',
        duration_s,
        [Submission(at, rng.choice(STEADY_MIX)) for at in starts for _ in range(burst_size)],
    )


def mixed_plan(rng: random.Random, jobs_per_minute: float, duration_s: float) -> Plan:
    gap_s = 60.0 / jobs_per_minute
    count = max(len(MIXED), int(duration_s / gap_s))
    jobs = [*MIXED, *(rng.choice(MIXED) for _ in range(count - len(MIXED)))]  # each kind once
    rng.shuffle(jobs)
    return Plan(
        'mixed-workload', duration_s, [Submission(i * gap_s, j) for i, j in enumerate(jobs)]
    )


def worker_failure_plan(
    rng: random.Random, failure_burst_size: int, recovery_interval_min: float, duration_s: float
) -> Plan:
    """Every `recovery_interval_min`, a burst of `failure_burst_size` runs and, once their steps
    run, a worker killed mid-step; one worker is also frozen past its lease once."""
    starts = _every(recovery_interval_min * 60.0, duration_s)
    submissions = [
        Submission(at, rng.choice(FAULTY_MIX)) for at in starts for _ in range(failure_burst_size)
    ]
    faults = [Fault(at + rng.uniform(3.0, 6.0), 'kill') for at in starts]
    faults.append(Fault(starts[len(starts) // 2] + rng.uniform(6.0, 9.0), 'freeze'))
    return Plan('worker-failure', duration_s, submissions, sorted(faults, key=lambda f: f.at_s))


def _every(interval_s: float, duration_s: float) -> list[float]:
    return [i * interval_s for i in range(max(1, int(duration_s // interval_s) + 1))]


def local_workers(data_dir: Path) -> dict[str, int]:
    """worker id -> pid of the stack's live worker processes (the ECS agent's, this machine)."""
    journal = str((data_dir / 'workers' / 'journal').resolve())
    found = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / 'cmdline').read_bytes().split(b'\0')
        except OSError:
            continue
        words = [word.decode(errors='replace') for word in argv]
        is_worker = any(Path(word).name == 'dagster-taskiq' for word in words[:2])
        if is_worker and '--worker-id' in words and journal in words:
            found[words[words.index('--worker-id') + 1]] = int(entry.name)
    return found


def busy_workers(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT DISTINCT owner FROM step_executions WHERE state = 'RUNNING'"
        )
        return {row[0] for row in rows}


@dataclass
class Progress:
    submitted: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    queue: dict[str, int] = field(default_factory=dict)
    desired: int | None = None
    running_workers: int | None = None
    faults: list[str] = field(default_factory=list)

    def table(self, plan: Plan, elapsed_s: float) -> Table:
        table = Table(title=f'{plan.name}: {elapsed_s:.0f} / {plan.duration_s:.0f} s')
        for column in (
            'submitted',
            'queued/running',
            'succeeded',
            'failed',
            'queue',
            'workers',
            'faults',
        ):
            table.add_column(column)
        going = sum(
            n for status, n in self.by_status.items() if status not in {e.value for e in ENDED}
        )
        table.add_row(
            f'{self.submitted}/{len(plan.submissions)}',
            str(going),
            str(self.by_status.get('SUCCESS', 0)),
            str(self.by_status.get('FAILURE', 0) + self.by_status.get('CANCELED', 0)),
            ' '.join(f'{k} {v}' for k, v in self.queue.items()),
            f'{self.running_workers} running / {self.desired} desired',
            f'{len(self.faults)}: {self.faults[-1]}' if self.faults else '0',
        )
        return table


@dataclass
class ScenarioResult:
    scenario_id: str
    run_ids: list[str]
    by_status: dict[str, int]
    faults: list[str]
    ended: bool


def run_scenario(
    plan: Plan,
    seed: int,
    data_dir: Path,
    console: Console,
    stop: threading.Event,
    wait_timeout_s: float = WAIT_TIMEOUT_S,
) -> ScenarioResult:
    """Carry `plan` out against the stack of `data_dir`; its runs' statuses once they ended (or
    the wait ran out, or `stop` was set)."""
    described = _stack(data_dir)
    target = find_target(data_dir, described['env'])
    engine = sync_engine(target.database_url)
    ensure_tables(engine)
    scenario_id = f'{plan.name}-{time.strftime("%Y%m%dT%H%M%S")}-{uuid.uuid4().hex[:6]}'
    client = graphql_client(described['webserver_url'])
    rng = random.Random(seed)
    progress = Progress()
    run_ids: list[str] = []
    pending = list(plan.submissions)
    faults = list(plan.faults)
    thawing: list[tuple[float, int, int]] = []  # (monotonic time to thaw, pid, fault id)
    started = time.monotonic()
    console.print(
        f'scenario {scenario_id} (seed {seed}): {len(pending)} runs, {len(faults)} faults'
    )
    try:
        with Live(progress.table(plan, 0), console=console, refresh_per_second=2) as live:
            last_refresh = 0.0
            while not stop.is_set():
                elapsed = time.monotonic() - started
                while pending and pending[0].at_s <= elapsed:
                    job_name, config = pending.pop(0).job
                    run_id = submit(client, job_name, config, tags={'load_scenario': scenario_id})
                    record_submission(engine, scenario_id, run_id, job_name, seed)
                    run_ids.append(run_id)
                    progress.submitted += 1
                while faults and faults[0].at_s <= elapsed:
                    fault = faults.pop(0)
                    injected = _inject(fault, rng, data_dir, target, engine, scenario_id, thawing)
                    if injected is None:  # no worker was running a step: try again shortly
                        faults.insert(0, Fault(elapsed + 1.0, fault.kind))
                        break
                    progress.faults.append(injected)
                for thaw in [t for t in thawing if t[0] <= time.monotonic()]:
                    thawing.remove(thaw)
                    _signal(thaw[1], signal.SIGCONT)
                    fault_ended(engine, thaw[2])
                if time.monotonic() - last_refresh >= REFRESH_S:
                    last_refresh = time.monotonic()
                    _observe(progress, target, run_ids)
                    live.update(progress.table(plan, elapsed))
                submitted_all = not pending and not faults and not thawing
                waited_out = elapsed >= plan.duration_s + wait_timeout_s
                if submitted_all and (_all_ended(progress, run_ids) or waited_out):
                    break
                stop.wait(0.2)
    finally:
        for _, pid, fault_id in thawing:  # never leave a worker frozen
            _signal(pid, signal.SIGCONT)
            fault_ended(engine, fault_id)
        engine.dispose()
    return ScenarioResult(
        scenario_id,
        run_ids,
        dict(progress.by_status),
        progress.faults,
        _all_ended(progress, run_ids),
    )


def _stack(data_dir: Path) -> dict[str, Any]:
    path = data_dir / STACK_FILE
    if not path.exists():
        raise FileNotFoundError(
            f'no stack at {data_dir} ({STACK_FILE} missing): start one with '
            f'`dagster-taskiq-demo up --data-dir {data_dir}`, or pass the --data-dir it uses'
        )
    described: dict[str, Any] = json.loads(path.read_text())
    return described


def _all_ended(progress: Progress, run_ids: list[str]) -> bool:
    ended = sum(progress.by_status.get(status.value, 0) for status in ENDED)
    return ended == len(run_ids)


def _observe(progress: Progress, target: Target, run_ids: list[str]) -> None:
    with psycopg.connect(target.database_url) as connection:
        rows = connection.execute(
            'SELECT status, count(*) FROM runs WHERE run_id = ANY(%s) GROUP BY 1', (run_ids,)
        )
        progress.by_status = {status: count for status, count in rows}
    progress.queue = {q['queue']: q['visible'] + q['in_flight'] for q in queue_depth(target)}
    status = ecs_status(target)
    progress.desired, progress.running_workers = status['desired'], status['running']


def _inject(
    fault: Fault,
    rng: random.Random,
    data_dir: Path,
    target: Target,
    engine: Any,
    scenario_id: str,
    thawing: list[tuple[float, int, int]],
) -> str | None:
    """Kill or freeze one worker that is running a step; what was done, or None if none was."""
    workers = local_workers(data_dir)
    candidates = sorted(set(workers) & busy_workers(target.database_url))
    if not candidates:
        return None
    worker_id = rng.choice(candidates)
    pid = workers[worker_id]
    if fault.kind == 'kill':
        record_fault(engine, scenario_id, 'kill', worker_id, f'SIGKILL pid {pid}')
        _signal(pid, signal.SIGKILL)
        return f'killed {worker_id}'
    frozen_s = Settings().lease_s + FREEZE_PAST_LEASE_S  # the stack's workers read the same
    fault_id = record_fault(engine, scenario_id, 'freeze', worker_id, f'SIGSTOP {frozen_s:.0f} s')
    _signal(pid, signal.SIGSTOP)
    thawing.append((time.monotonic() + frozen_s, pid, fault_id))
    return f'froze {worker_id} for {frozen_s:.0f} s'


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, signum)


def summary(result: ScenarioResult) -> Table:
    table = Table(title=f'scenario {result.scenario_id}')
    table.add_column('runs')
    table.add_column('by status')
    table.add_column('faults')
    table.add_row(
        str(len(result.run_ids)),
        ', '.join(f'{k} {v}' for k, v in sorted(result.by_status.items())),
        '\n'.join(result.faults) or 'none',
    )
    return table
