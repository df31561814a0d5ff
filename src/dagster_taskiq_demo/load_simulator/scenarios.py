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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import requests
import sqlalchemy.exc
import tenacity
from botocore.exceptions import BotoCoreError, ClientError
from dagster_graphql import DagsterGraphQLClientError
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine

from dagster_taskiq.settings import Settings
from dagster_taskiq.store import sync_engine
from dagster_taskiq_demo.ecs_agent import PARTITIONS_FILE
from dagster_taskiq_demo.load_simulator.records import (
    ensure_tables,
    fault_ended,
    record_fault,
    record_submission,
)
from dagster_taskiq_demo.local_stack import STACK_FILE
from dagster_taskiq_demo.operations import (
    Target,
    ecs_status,
    find_target,
    queue_depth,
    read_stack,
)
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
T = TypeVar('T')
WAIT_TIMEOUT_S = 600.0  # after the last submission, how long its runs may take to end
FREEZE_PAST_LEASE_S = 5.0  # a frozen worker stays stopped this long past its lease


class ScenarioError(RuntimeError):
    """The stack cannot carry out the scenario (said how to fix it)."""


@dataclass(frozen=True)
class Submission:
    at_s: float  # from the scenario's start
    job: JobChoice


@dataclass(frozen=True)
class Fault:
    at_s: float
    # 'kill': SIGKILL a worker running a step; 'freeze': SIGSTOP one past its lease, then SIGCONT;
    # 'partition': cut workers' `links` ('sqs', 'store') in `mode` ('drop': packets swallowed,
    # connections left open; 'reset': connections refused) for `length_s`, one worker running a
    # step or `scope` 'all'; 'db-restart': restart the stack's own PostgreSQL (fast shutdown)
    kind: str
    links: tuple[str, ...] = ()
    mode: str = 'drop'
    scope: str = 'one'
    length_s: float = 0.0


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
    run, a worker killed mid-step; once, a worker frozen past its lease; once, in the middle
    third, a restart of the stack's own PostgreSQL (skipped, and said, on a shared one)."""
    starts = _every(recovery_interval_min * 60.0, duration_s)
    submissions = [
        Submission(at, rng.choice(FAULTY_MIX)) for at in starts for _ in range(failure_burst_size)
    ]
    faults = [Fault(at + rng.uniform(3.0, 6.0), 'kill') for at in starts]
    faults.append(Fault(starts[len(starts) // 2] + rng.uniform(6.0, 9.0), 'freeze'))
    faults.append(Fault(rng.uniform(duration_s / 3, duration_s * 2 / 3), 'db-restart'))
    return Plan('worker-failure', duration_s, submissions, sorted(faults, key=lambda f: f.at_s))


PARTITION_GAP_S = 5.0  # between one partition's end and the next one's start
LINK_CHOICES = [('sqs',), ('store',), ('sqs', 'store')]


def network_partition_plan(rng: random.Random, max_burst_size: int, duration_s: float) -> Plan:
    """Bursts of 1 to `max_burst_size` runs every 15 s; one partition after another, each 10 to
    60 s (at most a third of the duration): SQS, the store or both, dropped or reset, of one
    worker running a step or of all workers."""
    starts = _every(15.0, duration_s)
    submissions = [
        Submission(at, rng.choice(FAULTY_MIX))
        for at in starts
        for _ in range(rng.randint(1, max_burst_size))
    ]
    faults = []
    at = rng.uniform(3.0, 6.0)
    while at < duration_s:
        length_s = rng.uniform(10.0, max(10.0, min(60.0, duration_s / 3)))
        links = rng.choice(LINK_CHOICES)
        mode, scope = rng.choice(['drop', 'reset']), rng.choice(['one', 'one', 'all'])
        faults.append(Fault(at, 'partition', links, mode, scope, length_s))
        at += length_s + PARTITION_GAP_S
    return Plan('network-partition', duration_s, submissions, faults)


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


# What a database restart or a webserver restart looks like from here: wait and try again.
TRANSIENT = (
    psycopg.OperationalError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    DagsterGraphQLClientError,
    requests.exceptions.ConnectionError,
    BotoCoreError,
    ClientError,
)
PATIENCE_S = 120.0


def patiently(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, tried again with backoff for up to PATIENCE_S while the stack is away."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TRANSIENT),
        wait=tenacity.wait_exponential(multiplier=0.2, max=2.0),
        stop=tenacity.stop_after_delay(PATIENCE_S),
        reraise=True,
    )
    return retrying(call, *args)


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
    if any(f.kind == 'partition' for f in plan.faults) and not described.get('fault_proxies'):
        raise ScenarioError(
            f'the stack in {data_dir} runs its workers without fault proxies: start it with '
            '`dagster-taskiq-demo up --fault-proxies` for network-partition'
        )
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
    injector = Injector(rng, data_dir, described, target, engine, scenario_id)
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
                    tags = {'load_scenario': scenario_id}
                    run_id = patiently(submit, client, job_name, config, tags)
                    patiently(record_submission, engine, scenario_id, run_id, job_name, seed)
                    run_ids.append(run_id)
                    progress.submitted += 1
                while faults and faults[0].at_s <= elapsed:
                    fault = faults.pop(0)
                    injected = injector.inject(fault)
                    if injected is None:  # no worker was running a step: try again shortly
                        faults.insert(0, replace(fault, at_s=elapsed + 1.0))
                        break
                    progress.faults.append(injected)
                injector.lift_due()
                if time.monotonic() - last_refresh >= REFRESH_S:
                    last_refresh = time.monotonic()
                    with contextlib.suppress(*TRANSIENT):  # a database restart: next time
                        _observe(progress, target, run_ids)
                    live.update(progress.table(plan, elapsed))
                submitted_all = not pending and not faults and not injector.lifts
                waited_out = elapsed >= plan.duration_s + wait_timeout_s
                if submitted_all and (_all_ended(progress, run_ids) or waited_out):
                    break
                stop.wait(0.2)
    finally:
        injector.lift_all()  # never leave a worker frozen or cut off
        engine.dispose()
    return ScenarioResult(
        scenario_id,
        run_ids,
        dict(progress.by_status),
        progress.faults,
        _all_ended(progress, run_ids),
    )


def _stack(data_dir: Path) -> dict[str, Any]:
    described = read_stack(data_dir)
    if described is None:
        raise ScenarioError(
            f'no stack at {data_dir} ({STACK_FILE} missing): start one with '
            f'`dagster-taskiq-demo up --data-dir {data_dir}`, or pass the --data-dir it uses'
        )
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


class Injector:
    """Injects a plan's faults into the stack, records each, and lifts them when their time
    comes (or at once, when the scenario ends early)."""

    def __init__(
        self,
        rng: random.Random,
        data_dir: Path,
        described: dict[str, Any],
        target: Target,
        engine: Engine,
        scenario_id: str,
    ) -> None:
        self.rng = rng
        self.data_dir = data_dir
        self.described = described
        self.target = target
        self.engine = engine
        self.scenario_id = scenario_id
        self.lifts: list[tuple[float, Callable[[], None]]] = []  # (monotonic time, lift)
        self.partitions: dict[str, dict[str, str]] = {}  # what partitions.json says

    def inject(self, fault: Fault) -> str | None:
        """Inject `fault`: what was done, or None when no worker was running a step."""
        if fault.kind == 'db-restart':
            return self._restart_database()
        workers = local_workers(self.data_dir)
        busy = sorted(set(workers) & patiently(busy_workers, self.target.database_url))
        if not busy:
            return None
        if fault.kind == 'partition':
            chosen = sorted(workers) if fault.scope == 'all' else [self.rng.choice(busy)]
            return self._partition(fault, chosen)
        worker_id = self.rng.choice(busy)
        pid = workers[worker_id]
        if fault.kind == 'kill':
            self._record('kill', worker_id, f'SIGKILL pid {pid}')
            _signal(pid, signal.SIGKILL)
            return f'killed {worker_id}'
        frozen_s = Settings().lease_s + FREEZE_PAST_LEASE_S  # the stack's workers read the same
        fault_id = self._record('freeze', worker_id, f'SIGSTOP {frozen_s:.0f} s')
        _signal(pid, signal.SIGSTOP)
        self._lift_later(frozen_s, lambda: self._thaw(pid, fault_id))
        return f'froze {worker_id} for {frozen_s:.0f} s'

    def lift_due(self) -> None:
        for lift in [entry for entry in self.lifts if entry[0] <= time.monotonic()]:
            self.lifts.remove(lift)
            lift[1]()

    def lift_all(self) -> None:
        for _, lift in self.lifts:
            lift()
        self.lifts.clear()

    def _record(self, kind: str, target: str, detail: str) -> int:
        return patiently(record_fault, self.engine, self.scenario_id, kind, target, detail)

    def _lift_later(self, after_s: float, lift: Callable[[], None]) -> None:
        self.lifts.append((time.monotonic() + after_s, lift))

    def _thaw(self, pid: int, fault_id: int) -> None:
        _signal(pid, signal.SIGCONT)
        patiently(fault_ended, self.engine, fault_id)

    def _partition(self, fault: Fault, worker_ids: list[str]) -> str:
        detail = f'{fault.mode} {"+".join(fault.links)} for {fault.length_s:.0f} s'
        fault_ids = [self._record('partition', worker_id, detail) for worker_id in worker_ids]
        for worker_id in worker_ids:
            self.partitions[worker_id] = {link: fault.mode for link in fault.links}
        self._write_partitions()

        def heal() -> None:
            for worker_id in worker_ids:
                self.partitions.pop(worker_id, None)
            self._write_partitions()
            for fault_id in fault_ids:
                patiently(fault_ended, self.engine, fault_id)

        self._lift_later(fault.length_s, heal)
        return f'cut {", ".join(worker_ids)}: {detail}'

    def _write_partitions(self) -> None:
        path = self.data_dir / 'workers' / PARTITIONS_FILE
        staged = path.with_suffix('.tmp')
        staged.write_text(json.dumps(self.partitions))
        staged.replace(path)  # the agent never reads half a file

    def _restart_database(self) -> str:
        """Fast shutdown of the stack's own PostgreSQL (every connection dropped); the stack
        restarts it, as RDS does after a reboot."""
        if not self.described.get('private_postgres'):
            return 'db-restart skipped: the stack does not run its own PostgreSQL'
        pid_file = self.data_dir / 'postgres' / 'postmaster.pid'
        pid = int(pid_file.read_text().split()[0])
        self._record('db-restart', 'postgres', f'SIGINT postmaster {pid}')
        _signal(pid, signal.SIGINT)
        return 'restarted the database'


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
