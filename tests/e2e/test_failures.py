"""Crashes, duplicates, cancellation, bad messages and shutdown, with real workers and runs."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef
from dagster._grpc.types import ExecuteStepArgs, ResumeRunArgs

from dagster_taskiq import message
from dagster_taskiq.step_process import TERMINAL_EVENTS
from tests.e2e.conftest import (
    ABANDON_GRACE_S,
    LEASE_S,
    SIGNING_KEY,
    STEP_START_TIMEOUT_S,
    Stack,
    WorkerProcess,
    attempts,
    run,
    slow_config,
)
from tests.e2e.jobs import demo_job
from tests.logs import events
from tests.waiting import wait_until

HEARTBEAT_S = LEASE_S / 3
pytestmark = pytest.mark.slow


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def step_pid(worker: WorkerProcess, step_key: str) -> int:
    """The pid of the step process `worker` started for `step_key` (from its JSON log)."""

    def logged_pid() -> int | None:
        started = [e for e in events(worker.log(), 'step_started') if e['step_key'] == step_key]
        return int(started[0]['pid']) if started else None

    return int(wait_until(logged_pid, what=f'{worker.worker_id} to start {step_key}'))


def step_events(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[Any]:
    return instance.get_records_for_run(run_id, of_type=event_type).records


def running_row(stack: Stack, step_key: str, attempt: int = 0) -> dict[str, Any] | None:
    rows = stack.rows(
        'SELECT * FROM step_executions WHERE step_key = %(step_key)s AND attempt = %(attempt)s'
        " AND state = 'RUNNING' ORDER BY enqueued_at DESC LIMIT 1",
        step_key=step_key,
        attempt=attempt,
    )
    return rows[0] if rows else None


def sqs(stack: Stack) -> Any:
    return boto3.client(
        'sqs', endpoint_url=stack.env['DAGSTER_TASKIQ_AWS_ENDPOINT_URL'], region_name='us-east-1'
    )


def test_sigkilled_worker_attempt_is_abandoned_and_retried_on_another(
    stack: Stack, instance: DagsterInstance
) -> None:
    workers = stack.start_workers(2, 1)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'slow_job', slow_config(4))
        row = wait_until(
            lambda: running_row(stack, 'sleep_then_return'), what='the slow step running'
        )
        [victim] = [w for w in workers if w.worker_id == row['owner']]
        orphan = step_pid(victim, 'sleep_then_return')
        victim.process.send_signal(signal.SIGKILL)
        wait_until(
            lambda: not pid_alive(orphan), timeout_s=5, what='the orphaned step process to die'
        )
        ok, run_id = outcome.result(timeout=120)
    assert ok
    steps = [r for r in stack.executions(run_id) if r['step_key'] == 'sleep_then_return']
    assert [(r['attempt'], r['state']) for r in steps] == [(0, 'ABANDONED'), (1, 'COMPLETED')]
    assert steps[0]['owner'] == victim.worker_id
    assert steps[1]['owner'] != victim.worker_id
    logged = [r for r in stack.log_rows(run_id) if r['step_key'] == 'sleep_then_return']
    assert [(r['attempt'], r['outcome']) for r in logged] == [(0, 'ABANDONED'), (1, 'COMPLETED')]


def test_a_retry_starts_within_the_failover_time_behind_a_200_step_backlog(
    stack: Stack, instance: DagsterInstance
) -> None:
    """A worker is SIGKILLed while 200 first attempts wait in the queue: the lost attempt's retry
    goes to the retry queue, which workers poll first, so it starts within lease + grace + one
    health check (+ the end of a running step for a free slot), not behind the backlog."""
    workers = stack.start_workers(2, 2)
    config = {'ops': {'split': {'config': {'width': 200}}, 'square': {'config': {'seconds': 1.0}}}}
    runner, dagster_run = start_run(instance, 'fan_out_job', config)
    try:

        def victim_under_a_backlog() -> dict[str, Any] | None:
            rows = stack.rows(
                'SELECT *, (SELECT count(*) FROM step_executions WHERE run_id = %(run_id)s'
                " AND state = 'QUEUED') AS queued FROM step_executions"
                " WHERE run_id = %(run_id)s AND step_key LIKE 'square[%%' AND state = 'RUNNING'"
                ' ORDER BY started_at LIMIT 1',
                run_id=dagster_run.run_id,
            )
            return rows[0] if rows and rows[0]['queued'] >= 150 else None

        running = wait_until(victim_under_a_backlog, what='a square running with >= 150 queued')
        [victim] = [w for w in workers if w.worker_id == running['owner']]
        victim.process.send_signal(signal.SIGKILL)
        [fault] = stack.rows('SELECT clock_timestamp() AS at')
        # the lost attempt: one the killed worker left unfinished (the square seen running may
        # have been finished by its worker between that look and the kill)
        [row, *_] = stack.rows(
            "SELECT * FROM step_executions WHERE owner = %(owner)s AND state <> 'COMPLETED'"
            " AND step_key LIKE 'square[%%' ORDER BY started_at",
            owner=victim.worker_id,
        )

        def retry_started() -> dict[str, Any] | None:
            rows = stack.rows(
                'SELECT started_at, (SELECT count(*) FROM step_executions WHERE run_id = %(run_id)s'
                " AND state = 'QUEUED') AS queued FROM execution_log"
                ' WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND attempt = 1',
                run_id=dagster_run.run_id,
                step_key=row['step_key'],
            )
            return rows[0] if rows else None

        retry = wait_until(retry_started, timeout_s=60, what='the retry of the lost attempt')
        failover_s = (retry['started_at'] - fault['at']).total_seconds()
        print(f'failover behind {retry["queued"]} queued first attempts: {failover_s:.1f} s')
        assert retry['queued'] >= 100  # it did not wait for the backlog
        assert failover_s < LEASE_S + ABANDON_GRACE_S + 1 + 1 + 2  # health check, a step, slack
    finally:
        terminate(instance, runner, dagster_run)
        runner.wait(timeout=60)


def test_a_queued_attempt_whose_message_was_lost_is_sent_again(
    stack: Stack, instance: DagsterInstance
) -> None:
    """The first step's message vanishes before any worker sees it (lost, or redriven to the
    DLQ by SQS): the store still says QUEUED, so the executor sends it again and the run
    finishes, instead of waiting for the queued timeout."""
    client = sqs(stack)
    execution = {'config': {'check_step_health_interval_seconds': 1, 'step_resend_seconds': 2}}
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'fast_job', {'execution': execution})
        response = wait_until(
            lambda: client.receive_message(QueueUrl=stack.urls.queue_url).get('Messages'),
            what='the first step message',
        )
        client.delete_message(
            QueueUrl=stack.urls.queue_url, ReceiptHandle=response[0]['ReceiptHandle']
        )
        stack.start_worker()
        ok, run_id = outcome.result(timeout=60)
    assert ok
    sent_again = [
        r.event_log_entry.dagster_event.message
        for r in step_events(instance, run_id, DagsterEventType.ENGINE_EVENT)
        if 'sent again' in (r.event_log_entry.dagster_event.message or '')
    ]
    assert sent_again  # every 2 s until a worker took it
    assert sent_again[0].startswith('Attempt 0 of step "ping" still queued 2 s after')
    assert [r['state'] for r in stack.executions(run_id)] == ['COMPLETED'] * 3
    assert client.receive_message(QueueUrl=stack.urls.dlq_url).get('Messages') is None


def test_a_message_delivered_three_times_runs_once(stack: Stack, instance: DagsterInstance) -> None:
    client = sqs(stack)
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'fast_job')

        def first_message() -> Any:
            response = client.receive_message(
                QueueUrl=stack.urls.queue_url,
                VisibilityTimeout=0,
                MessageAttributeNames=['All'],
            )
            return response.get('Messages', [None])[0]

        original = wait_until(first_message, what='the first step message')
        for _ in range(2):
            client.send_message(
                QueueUrl=stack.urls.queue_url,
                MessageBody=original['Body'],
                MessageAttributes=original['MessageAttributes'],
            )
        stack.start_workers(2, 2)
        ok, run_id = outcome.result(timeout=120)
    assert ok
    key = json.loads(original['Body'])['idempotency_key']
    [row] = [r for r in stack.executions(run_id) if r['idempotency_key'] == key]
    assert row['state'] == 'COMPLETED'
    assert row['delivery_count'] >= 3
    assert row['refused_count'] == row['delivery_count'] - 1
    keys = [r['idempotency_key'] for r in stack.log_rows(run_id)]
    assert len(keys) == len(set(keys)) == 3  # every attempt ran exactly once


def test_malformed_and_forged_messages_go_to_the_dlq(
    stack: Stack, instance: DagsterInstance
) -> None:
    client = sqs(stack)
    client.send_message(QueueUrl=stack.urls.queue_url, MessageBody='{"v": 1, "run_id": ')
    forged = message.OpExecutionTask(
        v=1,
        idempotency_key='run-x:step:0',
        run_id='run-x',
        job_name='fast_job',
        step_key='step',
        attempt=0,
        enqueued_at=time.time(),
        execute_step_args='{}',
    )
    client.send_message(
        QueueUrl=stack.urls.queue_url, MessageBody=message.encode(forged, b'not-the-key')
    )
    foreign_home = stack.tmp_path / 'foreign_home'  # another instance's storage: its own SQLite
    foreign_home.mkdir()
    (foreign_home / 'dagster.yaml').write_text('telemetry:\n  enabled: false\n')
    args = ExecuteStepArgs(
        job_origin=demo_job('fast_job').get_python_origin(),
        run_id='run-y',
        step_keys_to_execute=['ping'],
        instance_ref=InstanceRef.from_dir(str(foreign_home)),
    )
    foreign = message.build_task(args, job_name='fast_job', enqueued_at=time.time())
    client.send_message(  # signed with the right key: only the instance is wrong
        QueueUrl=stack.urls.queue_url, MessageBody=message.encode(foreign, SIGNING_KEY.encode())
    )
    worker = stack.start_worker(concurrency=1)

    def dead_letters() -> list[str]:
        response = client.receive_message(
            QueueUrl=stack.urls.dlq_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0,
            MessageAttributeNames=['All'],
        )
        found = [
            m['MessageAttributes']['reason']['StringValue'] for m in response.get('Messages', [])
        ]
        return found if len(found) == 3 else []

    reasons = sorted(wait_until(dead_letters, what='three dead letters'))
    assert reasons[0].startswith('bad JSON')
    assert reasons[1].startswith('bad signature')
    assert reasons[2].startswith('foreign instance: the message names a Dagster instance')
    assert len(events(worker.log(), 'message_rejected')) == 3
    ok, _ = run(instance, 'fast_job')
    assert ok  # the worker kept serving


def start_run(
    instance: DagsterInstance, job_name: str, config: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], Any]:
    """The job in a run worker process of its own (as a run launcher starts one), once a step of
    it has started in Dagster."""
    tag = uuid.uuid4().hex
    runner = subprocess.Popen(
        [sys.executable, '-m', 'tests.e2e.run_job', job_name, json.dumps(config), tag],
        env=os.environ.copy(),
    )
    try:
        dagster_run = wait_until(
            lambda: instance.get_runs(RunsFilter(tags={'e2e': tag})),
            timeout_s=STEP_START_TIMEOUT_S,
            what='the run',
        )[0]
        wait_until(
            lambda: step_events(instance, dagster_run.run_id, DagsterEventType.STEP_START),
            timeout_s=STEP_START_TIMEOUT_S,
            what='a step to start in Dagster',
        )
    except BaseException:
        runner.kill()
        runner.wait()
        raise
    return runner, dagster_run


def start_slow_run(
    instance: DagsterInstance, seconds: float
) -> tuple[subprocess.Popen[bytes], Any]:
    return start_run(instance, 'slow_job', slow_config(seconds))


def terminate(instance: DagsterInstance, runner: subprocess.Popen[bytes], dagster_run: Any) -> None:
    """What Dagster's run launcher does to terminate a run: mark it, then interrupt its worker."""
    instance.report_run_canceling(dagster_run)
    runner.send_signal(signal.SIGINT)


def test_terminating_a_run_stops_its_running_step(stack: Stack, instance: DagsterInstance) -> None:
    worker = stack.start_worker(concurrency=1)
    runner, dagster_run = start_slow_run(instance, seconds=60)
    try:
        pid = step_pid(worker, 'sleep_then_return')
        terminate(instance, runner, dagster_run)
        wait_until(
            lambda: stack.executions(dagster_run.run_id)[0]['state'] == 'CANCELLED',
            what='the attempt cancelled',
        )
        wait_until(lambda: not pid_alive(pid), what='the step process stopped')
        assert runner.wait(60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert instance.get_run_by_id(dagster_run.run_id).status == DagsterRunStatus.CANCELED
    assert attempts(stack, dagster_run.run_id) == [('sleep_then_return', 0, 'CANCELLED')]
    assert [r['outcome'] for r in stack.log_rows(dagster_run.run_id)] == ['CANCELLED']
    [stopped] = events(worker.log(), 'step_stopped')
    assert stopped['reason'] == 'cancelled through Dagster'
    # Dagster agrees: the interrupted attempt ends with its own terminal event (a retry, under the
    # op's policy), written by its worker once the store said CANCELLED; never a success
    [ended] = wait_until(
        lambda: instance.get_records_for_run(dagster_run.run_id, of_type=TERMINAL_EVENTS).records,
        what="the interrupted step's end in Dagster",
    )
    assert ended.event_log_entry.step_key == 'sleep_then_return'
    assert ended.event_log_entry.dagster_event_type == DagsterEventType.STEP_UP_FOR_RETRY


def test_sigterm_lets_a_running_step_finish(stack: Stack, instance: DagsterInstance) -> None:
    draining = stack.start_worker(1, '--drain-timeout', '60')
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'slow_job', slow_config(2))
        wait_until(
            lambda: running_row(stack, 'sleep_then_return'),
            what='the slow step',
            timeout_s=STEP_START_TIMEOUT_S,
        )
        draining.process.send_signal(signal.SIGTERM)
        assert draining.process.wait(60) == 0
        stack.start_worker(concurrency=1)
        ok, run_id = outcome.result(timeout=120)
    assert ok
    steps = [r for r in stack.executions(run_id) if r['step_key'] == 'sleep_then_return']
    assert [(r['attempt'], r['state'], r['owner']) for r in steps] == [
        (0, 'COMPLETED', draining.worker_id)
    ]


def test_sigterm_past_the_drain_timeout_releases_the_step(
    stack: Stack, instance: DagsterInstance
) -> None:
    released = stack.start_worker(1, '--drain-timeout', '0.2')
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, instance, 'slow_job', slow_config(3))
        wait_until(
            lambda: running_row(stack, 'sleep_then_return'),
            what='the slow step',
            timeout_s=STEP_START_TIMEOUT_S,
        )
        released.process.send_signal(signal.SIGTERM)
        assert released.process.wait(30) == 0
        assert len(events(released.log(), 'step_released')) == 1
        stack.start_worker(concurrency=1)
        ok, run_id = outcome.result(timeout=120)
    assert ok
    steps = [r for r in stack.executions(run_id) if r['step_key'] == 'sleep_then_return']
    assert [(r['attempt'], r['state']) for r in steps] == [(0, 'ABANDONED'), (1, 'COMPLETED')]


def test_a_poll_cut_short_by_sigterm_gives_its_message_back(stack: Stack) -> None:
    """SQS still answers a long poll its worker gave up: that message must not go invisible."""
    client = sqs(stack)
    stopping = stack.start_worker(1, '--poll-wait', '20', '--log-level', 'debug')
    wait_until(lambda: events(stopping.log(), 'receive_started'), what='a long poll going out')
    stopping.process.send_signal(signal.SIGTERM)
    client.send_message(QueueUrl=stack.urls.queue_url, MessageBody='sent during the stop')
    assert stopping.process.wait(30) == 0
    # visible again at once, not after the visibility timeout (2 x LEASE_S here)
    response = client.receive_message(QueueUrl=stack.urls.queue_url, WaitTimeSeconds=1)
    assert [m['Body'] for m in response.get('Messages', [])] == ['sent during the stop']
    assert len(events(stopping.log(), 'message_given_back')) == 1


def test_a_run_marked_canceling_launches_nothing_more(
    stack: Stack, instance: DagsterInstance
) -> None:
    """The run is marked CANCELING while a step runs, and its run worker is not (yet) signalled:
    the next step must not be launched, and the run ends CANCELED with no attempt left open."""
    stack.start_worker(concurrency=1)
    runner, dagster_run = start_slow_run(instance, seconds=3)
    try:
        instance.report_run_canceling(dagster_run)
        assert runner.wait(120) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert instance.get_run_by_id(dagster_run.run_id).status == DagsterRunStatus.CANCELED
    launched = [step for step, _, _ in attempts(stack, dagster_run.run_id)]
    assert launched == ['sleep_then_return']  # add_one, ready after CANCELING, was not launched
    assert all(r['outcome'] is not None for r in stack.log_rows(dagster_run.run_id))  # none open


@pytest.mark.slow
def test_terminating_a_fifty_step_run_mid_flight(stack: Stack, instance: DagsterInstance) -> None:
    """50 steps (split, 48 squares of 0.5 s, total) on 2 workers x 2 slots, terminated once a few
    squares are done: nothing is launched once the run is CANCELING, no start is left open, and
    Dagster and the store agree on every attempt."""
    stack.start_workers(2, 2)
    config = {'ops': {'split': {'config': {'width': 48}}, 'square': {'config': {'seconds': 0.5}}}}
    runner, dagster_run = start_run(instance, 'fan_out_job', config)
    run_id = dagster_run.run_id
    try:
        wait_until(
            lambda: len([s for _, _, s in attempts(stack, run_id) if s == 'COMPLETED']) >= 6,
            timeout_s=STEP_START_TIMEOUT_S,
            what='a few squares done',
        )
        terminate(instance, runner, dagster_run)
        [canceling] = stack.rows('SELECT clock_timestamp() AS at')  # after CANCELING committed
        assert runner.wait(120) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.CANCELED
    rows = stack.executions(run_id)
    assert len(rows) < 50  # it was stopped mid-flight
    assert all(r['enqueued_at'] < canceling['at'] for r in rows)  # nothing launched after

    def starts_closed() -> bool:
        return all(r['outcome'] is not None for r in stack.log_rows(run_id))

    wait_until(starts_closed, what='every start closed with its outcome')
    terminal: dict[str, list[DagsterEventType]] = {}
    for record in instance.get_records_for_run(run_id, of_type=TERMINAL_EVENTS).records:
        entry = record.event_log_entry
        terminal.setdefault(str(entry.step_key), []).append(entry.get_dagster_event().event_type)
    for row in stack.executions(run_id):
        ended = terminal.get(row['step_key'], [])
        seen = (row['step_key'], row['state'], row['error'], ended)
        assert ended.count(DagsterEventType.STEP_SUCCESS) == (row['state'] == 'COMPLETED'), seen
        if row['state'] == 'FAILED':  # claimed as the run stopped: Dagster refused to run it
            assert ended == [] and 'Dagster did not execute the step (run CANCEL' in row['error']
        else:
            assert row['state'] in ('COMPLETED', 'CANCELLED'), seen


@pytest.mark.slow
def test_a_run_resumed_after_its_run_worker_died_finishes(
    stack: Stack, instance: DagsterInstance
) -> None:
    """The run worker and the step's worker are killed mid-step; once the attempt's lease has
    expired past its grace, the run is resumed as Dagster's run monitoring does (`dagster api
    resume_run`). Dagster relaunches the in-flight step under the same attempt key: that must
    re-attach to the dead attempt (never run it twice, never fail the run on the key), and the
    op's RetryPolicy then runs it as attempt 1."""
    [doomed] = stack.start_workers(1, 1)
    config = {'ops': {'recorded_sleep': {'config': {'seconds': 60, 'retry_seconds': 0.2}}}}
    runner, dagster_run = start_run(instance, 'recorded_job', config)
    run_id = dagster_run.run_id
    try:
        wait_until(
            lambda: running_row(stack, 'recorded_sleep'),
            timeout_s=STEP_START_TIMEOUT_S,
            what='the step running',
        )
    finally:
        runner.kill()  # the run worker dies: the run stays STARTED, its step is in flight
        runner.wait()
        doomed.process.kill()  # and so does the step, with its worker
        doomed.process.wait()
    wait_until(
        lambda: stack.rows(
            'SELECT 1 FROM step_executions WHERE run_id = %(run_id)s'
            " AND lease_expires_at + interval '1.5 seconds' < now()",
            run_id=run_id,
        ),
        what='the dead attempt abandonable',
    )
    stack.start_worker(concurrency=1)
    resume = ResumeRunArgs(
        job_origin=demo_job('recorded_job').get_python_origin(),
        run_id=run_id,
        instance_ref=instance.get_ref(),
    )
    command = [sys.executable, '-m', *resume.get_command_args()]  # `dagster api resume_run ...`
    resumed = subprocess.run(command, env=os.environ.copy(), timeout=180)
    assert resumed.returncode == 0
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS
    assert [(a, s) for step, a, s in attempts(stack, run_id) if step == 'recorded_sleep'] == [
        (0, 'ABANDONED'),
        (1, 'COMPLETED'),
    ]
    successes = step_events(instance, run_id, DagsterEventType.STEP_SUCCESS)
    assert sorted(r.event_log_entry.step_key for r in successes) == ['add_one', 'recorded_sleep']
