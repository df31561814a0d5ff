"""Faults that test exactly-once at its core: no two attempts of a step ever run at once.

The demo op `recorded_sleep` writes its own record of when each attempt's user code began, was
last alive and ended (`demo_op_runs`), outside the store and Dagster: what the tests check.
"""

import asyncio
import itertools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import psycopg
import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues
from dagster_taskiq_demo.definitions import ALIVE_INTERVAL_S
from dagster_taskiq_demo.faultproxy import FaultProxy, Mode
from dagster_taskiq_demo.stack import WorkerProcess
from tests.e2e.conftest import LEASE_S, STEP_START_TIMEOUT_S, Stack, attempts, run
from tests.logs import events
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
STEP = 'recorded_sleep'
ENDPOINT_VARIABLE = 'DAGSTER_TASKIQ_AWS_ENDPOINT_URL'
# A store outage this long outlasts 2 deliveries each taken, deferred 5 s and taken again
OUTAGE_S = 20.0


def recorded_config(seconds: float, with_child: bool = False) -> dict[str, Any]:
    return {'ops': {STEP: {'config': {'seconds': seconds, 'with_child': with_child}}}}


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def op_runs(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    try:
        return stack.rows(
            'SELECT * FROM demo_op_runs WHERE run_id = %(run_id)s ORDER BY step_key, attempt',
            run_id=run_id,
        )
    except psycopg.errors.UndefinedTable:  # no op has recorded anything yet
        return []


def assert_no_overlap(runs: list[dict[str, Any]]) -> None:
    """Each attempt began after the one before it was dead (ended, or last alive + one beat)."""
    for earlier, later in itertools.pairwise(runs):
        if earlier['step_key'] != later['step_key']:
            continue
        dead_by = earlier['ended_at'] or earlier['alive_at'] + timedelta(seconds=ALIVE_INTERVAL_S)
        assert later['begun_at'] > dead_by, (earlier, later)


def running_attempt(stack: Stack) -> dict[str, Any]:
    """The RUNNING row of the recorded step, once there is one."""
    return wait_until(
        lambda: stack.rows(
            "SELECT * FROM step_executions WHERE step_key = %(step)s AND state = 'RUNNING'",
            step=STEP,
        ),
        timeout_s=STEP_START_TIMEOUT_S,
        what='the step running',
    )[0]


@contextmanager
def owner_frozen(
    stack: Stack, workers: list[WorkerProcess]
) -> Iterator[tuple[dict[str, Any], WorkerProcess]]:
    """SIGSTOP the worker of the recorded step once its op has begun, SIGCONT on leaving:
    (the op's first record, the frozen worker)."""
    row = running_attempt(stack)
    [first] = wait_until(lambda: op_runs(stack, row['run_id']), what='the op recording')
    [frozen] = [w for w in workers if w.worker_id == row['owner']]
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        yield first, frozen
    finally:
        frozen.process.send_signal(signal.SIGCONT)


def wait_resumed_without_writing(worker: WorkerProcess) -> None:
    """Wait until the resumed `worker` found its lease gone or its deadline passed."""
    wait_until(
        lambda: events(worker.log(), 'step_finish_refused') + events(worker.log(), 'step_stopped'),
        what='the resumed worker to see its step gone',
    )


def step_successes(instance: DagsterInstance, run_id: str, step_key: str) -> int:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records
    return sum(record.event_log_entry.step_key == step_key for record in records)


def test_a_frozen_workers_step_dies_by_itself_before_its_lease_expires(
    stack: Stack, instance: DagsterInstance
) -> None:
    """SIGSTOP the worker past its lease: its step (and the process the op started) must stop on
    its own, before the lease expires; the retry runs elsewhere; Dagster and the store agree."""
    workers = stack.start_workers(2, 1)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'recorded_job', recorded_config(8, with_child=True))
        with owner_frozen(stack, workers) as (first, frozen):
            wait_until(
                lambda: not pid_alive(first['pid']),
                timeout_s=2 * LEASE_S,
                what='the step process to kill itself',
            )
            [lease] = stack.rows(  # nothing renews it while its worker is frozen
                'SELECT lease_expires_at FROM step_executions WHERE run_id = %(run_id)s'
                ' AND step_key = %(step)s',
                run_id=first['run_id'],
                step=STEP,
            )
            [killed] = op_runs(stack, first['run_id'])  # its last sign of life, on the DB's clock
            dead_by = killed['alive_at'] + timedelta(seconds=ALIVE_INTERVAL_S)
            assert dead_by < lease['lease_expires_at']  # it died while its lease still held
            wait_until(lambda: not pid_alive(first['child_pid']), what='the op child to die')
            ok, run_id = outcome.result(timeout=120)
    assert ok
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == STEP] == [
        (0, 'ABANDONED'),
        (1, 'COMPLETED'),
    ]
    assert step_successes(instance, run_id, STEP) == 1
    runs = op_runs(stack, run_id)
    assert [(r['attempt'], r['ended_at'] is None) for r in runs] == [(0, True), (1, False)]
    assert_no_overlap(runs)
    wait_resumed_without_writing(frozen)
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == STEP] == [
        (0, 'ABANDONED'),
        (1, 'COMPLETED'),
    ]  # the resumed worker changed nothing
    assert step_successes(instance, run_id, STEP) == 1


def effects(stack: Stack, run_id: str) -> list[tuple[str, Any]]:
    rows = stack.rows(
        'SELECT idempotency_key, payload FROM step_effects WHERE run_id = %(run_id)s'
        ' AND step_key = %(step)s ORDER BY id',
        run_id=run_id,
        step=STEP,
    )
    return [(r['idempotency_key'].rsplit(':', 1)[1], r['payload']) for r in rows]


def test_a_step_that_ends_while_its_worker_is_frozen_records_no_success(
    stack: Stack, instance: DagsterInstance
) -> None:
    """The step's user code ends, and its outcome waits for a worker frozen past the lease: the
    retry succeeds elsewhere, and the resumed worker's finish is refused. Dagster must show one
    success, the retry's, and the store one effect, the retry's: the first attempt's STEP_SUCCESS
    would otherwise be in Dagster's event log under an abandoned attempt."""
    workers = stack.start_workers(2, 1)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'recorded_job', recorded_config(1))
        with owner_frozen(stack, workers) as (first, frozen):
            [ended] = wait_until(
                lambda: [r for r in op_runs(stack, first['run_id']) if r['ended_at']],
                what='the op to end while its worker is frozen',
            )
            assert ended['pid'] == first['pid']
            ok, run_id = outcome.result(timeout=120)
    assert ok
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == STEP] == [
        (0, 'ABANDONED'),
        (1, 'COMPLETED'),
    ]
    wait_resumed_without_writing(frozen)
    assert step_successes(instance, run_id, STEP) == 1
    assert effects(stack, run_id) == [('1', {'attempt': 1})]
    assert [r['attempt'] for r in op_runs(stack, run_id) if r['ended_at']] == [0, 1]
    assert_no_overlap(op_runs(stack, run_id))


@pytest.mark.parametrize('cut', ['store', 'sqs'])
def test_a_worker_cut_off_by_a_partition_never_overlaps_the_retry(
    stack: Stack, instance: DagsterInstance, cut: str
) -> None:
    """Packets dropped, connections left open, between one worker and PostgreSQL (its store) or
    SQS. Cut off from the store, it must stop its step before the lease expires (the retry runs
    on the other worker); cut off from SQS, it keeps its lease and finishes. Either way the op's
    own record shows no two attempts at once, and Dagster and the store agree."""
    target = urlsplit(stack.database_url if cut == 'store' else stack.env[ENDPOINT_VARIABLE])
    # the worker's store only: the op records its own liveness directly (DATABASE_URL), uncut
    variable = 'DAGSTER_TASKIQ_DATABASE_URL' if cut == 'store' else ENDPOINT_VARIABLE
    with (
        FaultProxy('127.0.0.1', target.port or 0) as first,
        FaultProxy('127.0.0.1', target.port or 0) as second,
    ):
        proxies = {}
        for proxy in (first, second):  # each worker through a proxy of its own
            through_proxy = target._replace(netloc=f'{target.hostname}:{proxy.port}').geturl()
            env = {variable: through_proxy, 'DAGSTER_TASKIQ_STORE_CALL_TIMEOUT_S': '2'}
            [worker] = stack.start_workers(1, 1, env=env)
            proxies[worker.worker_id] = (proxy, worker)
        with ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(run, instance, 'recorded_job', recorded_config(6))
            row = running_attempt(stack)
            cut_off, partitioned = proxies[row['owner']]
            cut_off.set_mode(Mode.DROP)
            ok, run_id = outcome.result(timeout=120)
            cut_off.set_mode(Mode.RESET)
    assert ok
    expected = [(0, 'ABANDONED'), (1, 'COMPLETED')] if cut == 'store' else [(0, 'COMPLETED')]
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == STEP] == expected
    assert step_successes(instance, run_id, STEP) == 1
    assert_no_overlap(op_runs(stack, run_id))
    logged = [(r['attempt'], r['outcome']) for r in stack.log_rows(run_id) if r['step_key'] == STEP]
    assert logged == expected
    if cut == 'sqs':  # the cut took effect: the message's visibility could not be extended
        assert events(partitioned.log(), 'visibility_not_extended')


def forkserver_of(worker: WorkerProcess) -> int:
    """The pid of the worker's forkserver (its child running multiprocessing's forkserver)."""
    children = [  # of every thread: a forkserver started again is a child of the thread doing it
        child
        for thread in Path(f'/proc/{worker.process.pid}/task').iterdir()
        for child in (thread / 'children').read_text().split()
    ]
    [pid] = [int(c) for c in children if b'forkserver' in Path(f'/proc/{c}/cmdline').read_bytes()]
    return pid


def test_a_step_outlives_its_forkserver_and_the_next_step_gets_a_new_one(
    stack: Stack, instance: DagsterInstance
) -> None:
    """The forkserver (the warm parent of step processes) is killed while a step runs: that step
    still completes as itself (not taken for dead and retried), and the next step starts from a
    forkserver started again."""
    [worker] = stack.start_workers(1, 1)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'recorded_job', recorded_config(2))
        row = running_attempt(stack)
        wait_until(lambda: op_runs(stack, row['run_id']), what='the op recording')
        forkserver = forkserver_of(worker)
        os.kill(forkserver, signal.SIGKILL)
        ok, run_id = outcome.result(timeout=120)
    assert ok
    assert attempts(stack, run_id) == [('add_one', 0, 'COMPLETED'), (STEP, 0, 'COMPLETED')]
    assert [r['ended_at'] is not None for r in op_runs(stack, run_id)] == [True]
    assert forkserver_of(worker) != forkserver  # started again for add_one


@pytest.mark.timeout(180)
def test_a_store_outage_longer_than_the_redrive_strands_nothing(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' link to PostgreSQL drops every packet for longer than SQS's redrive would
    take (2 receives here) if each delivery were taken and deferred: a worker that cannot reach
    the store stops taking messages, so the message is still in the queue when the store returns,
    the run finishes, and the DLQ stays empty."""
    monkeypatch.setenv('DAGSTER_TASKIQ_QUEUE_NAME', f'outage-{uuid.uuid4().hex[:8]}')
    monkeypatch.setenv('DAGSTER_TASKIQ_MAX_RECEIVE_COUNT', '2')
    urls = asyncio.run(bootstrap_queues(Settings()))
    target = urlsplit(stack.database_url)
    with FaultProxy('127.0.0.1', target.port or 0) as proxy:
        through_proxy = target._replace(netloc=f'{target.hostname}:{proxy.port}').geturl()
        env = {
            'DAGSTER_TASKIQ_DATABASE_URL': through_proxy,  # the workers' store only
            'DAGSTER_TASKIQ_STORE_CALL_TIMEOUT_S': '2',
        }
        [worker] = stack.start_workers(1, 1, env=env)
        proxy.set_mode(Mode.DROP)
        with ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(run, instance, 'recorded_job', recorded_config(0.2))
            wait_until(lambda: events(worker.log(), 'claim_deferred'), what='a claim deferred')
            time.sleep(OUTAGE_S)  # the fault's length, not a wait for anything
            proxy.set_mode(Mode.RESET)  # the dropped connections end; new ones get through
            proxy.set_mode(Mode.PASS)
            ok, run_id = outcome.result(timeout=60)  # stranded, it would never end
    assert ok
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == STEP] == [(0, 'COMPLETED')]
    dead = boto3.client(
        'sqs', endpoint_url=stack.env[ENDPOINT_VARIABLE], region_name='us-east-1'
    ).receive_message(QueueUrl=urls.dlq_url, WaitTimeSeconds=0)
    assert dead.get('Messages', []) == []


def test_a_database_reset_under_the_run_and_the_workers(
    stack: Stack, instance: DagsterInstance
) -> None:
    """Every connection to the database reset mid-run (the run worker's kept storage
    connections, the workers' and the step process's): the run still finishes, nothing is left
    RUNNING."""
    stack.start_workers(1, 1)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'recorded_job', recorded_config(4))
        row = running_attempt(stack)
        wait_until(lambda: op_runs(stack, row['run_id']), what='the op recording')
        [reset] = stack.rows(
            'SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity'
            ' WHERE datname = current_database() AND pid <> pg_backend_pid()'
        )
        assert reset['n'] >= 3  # the run worker's, the worker's, the step process's at least
        ok, run_id = outcome.result(timeout=120)
    assert ok
    # the op's own connection was reset too: its attempt may have failed and been retried
    assert {state for _, _, state in attempts(stack, run_id)} <= {
        'COMPLETED',
        'FAILED',
        'ABANDONED',
    }
    assert (
        stack.rows(
            "SELECT 1 FROM step_executions WHERE run_id = %(run_id)s AND state = 'RUNNING'",
            run_id=run_id,
        )
        == []
    )
    assert step_successes(instance, run_id, STEP) == 1
    assert_no_overlap(op_runs(stack, run_id))
