"""Real Dagster runs through real worker subprocesses: every demo job ends as it should."""

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path

import boto3
import pytest
from dagster import DagsterEventType, DagsterInstance

from dagster_taskiq_demo.emulator import free_port
from tests.e2e.conftest import LEASE_S, Stack, attempts, run
from tests.e2e.up import children
from tests.logs import events
from tests.waiting import wait_until


def step_starts(instance: DagsterInstance, run_id: str) -> Counter[str]:
    """Starts of each step in Dagster's event log, one per attempt (a retry is STEP_RESTARTED)."""
    of_type = {DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED}
    records = instance.get_records_for_run(run_id, of_type=of_type).records
    return Counter(record.event_log_entry.step_key for record in records)


@pytest.mark.slow
def test_demo_jobs_end_as_expected(stack: Stack, instance: DagsterInstance) -> None:
    port = free_port()
    stack.start_workers(1, 4, '--metrics-port', str(port))
    stack.start_workers(1, 4)

    ok, run_id = run(instance, 'fast_job')
    assert ok
    assert step_starts(instance, run_id) == {'ping': 1, 'add_one': 1, 'add_one_2': 1}
    assert attempts(stack, run_id) == [
        ('add_one', 0, 'COMPLETED'),
        ('add_one_2', 0, 'COMPLETED'),
        ('ping', 0, 'COMPLETED'),
    ]
    assert len(stack.log_rows(run_id)) == 3
    assert_stdout_captured_and_mirrored(stack, instance, run_id)

    ok, run_id = run(instance, 'fan_out_job')
    assert ok
    starts = step_starts(instance, run_id)
    assert sum(1 for key in starts if key.startswith('square[')) == 12
    assert set(starts.values()) == {1}
    assert {state for _, _, state in attempts(stack, run_id)} == {'COMPLETED'}
    owners = {r['owner'] for r in stack.executions(run_id)}
    assert len(owners) == 2  # both workers took part

    ok, run_id = run(instance, 'failing_job')
    assert not ok
    assert attempts(stack, run_id) == [('always_fails', 0, 'FAILED')]
    [failure] = stack.executions(run_id)
    assert 'this op always fails' in failure['error']

    ok, run_id = run(instance, 'flaky_job')
    assert ok
    assert step_starts(instance, run_id) == {'fails_first_time': 2, 'add_one': 1}
    assert attempts(stack, run_id) == [
        ('add_one', 0, 'COMPLETED'),
        ('fails_first_time', 0, 'FAILED'),
        ('fails_first_time', 1, 'COMPLETED'),
    ]

    ok, run_id = run(instance, 'crashing_job')
    assert ok
    assert attempts(stack, run_id) == [
        ('add_one', 0, 'COMPLETED'),
        ('crashes_first_time', 0, 'FAILED'),
        ('crashes_first_time', 1, 'COMPLETED'),
    ]
    crashed = stack.executions(run_id)[1]
    assert 'step process exited with code 3' in crashed['error']

    ok, run_id = run(
        instance, 'slow_job', {'ops': {'sleep_then_return': {'config': {'seconds': 0.5}}}}
    )
    assert ok
    assert attempts(stack, run_id) == [
        ('add_one', 0, 'COMPLETED'),
        ('sleep_then_return', 0, 'COMPLETED'),
    ]

    ok, run_id = run(instance, 'side_effect_job')
    assert ok
    effects = stack.rows(
        'SELECT step_key, payload FROM step_effects WHERE run_id = %(run_id)s ORDER BY step_key',
        run_id=run_id,
    )
    assert [(e['step_key'], e['payload']['step_key']) for e in effects] == [
        ('effect_a', 'effect_a'),
        ('effect_b', 'effect_b'),
        ('effect_c', 'effect_c'),
    ]
    assert_health_and_metrics(port)


@pytest.mark.slow
def test_outputs_travel_between_workers_through_s3(
    stack: Stack, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = 'dagster-taskiq-e2e'
    endpoint = stack.env['DAGSTER_TASKIQ_AWS_ENDPOINT_URL']
    s3 = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1')
    s3.create_bucket(Bucket=bucket)
    s3_env = {
        'DAGSTER_TASKIQ_DEMO_S3_BUCKET': bucket,
        'DAGSTER_TASKIQ_DEMO_S3_ENDPOINT_URL': endpoint,
    }
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    stack.start_workers(2, 1, env=s3_env)
    ok, run_id = run(instance, 'fast_job')
    assert ok
    keys = {
        item['Key']
        for item in s3.list_objects_v2(Bucket=bucket, Prefix='demo/').get('Contents', [])
    }
    assert {
        f'demo/storage/{run_id}/{step}/result' for step in ('ping', 'add_one', 'add_one_2')
    } <= keys


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + ' '))


def assert_stdout_captured_and_mirrored(
    stack: Stack, instance: DagsterInstance, run_id: str
) -> None:
    """ping's print is in its compute log (what the UI's "View stdout" shows) and, once, in the
    output of the worker that ran it."""
    [captured] = [
        record.event_log_entry.dagster_event.logs_captured_data
        for record in instance.get_records_for_run(
            run_id, of_type=DagsterEventType.LOGS_CAPTURED
        ).records
        if record.event_log_entry.dagster_event is not None
        and record.event_log_entry.dagster_event.logs_captured_data.step_keys == ['ping']
    ]
    manager = instance.compute_log_manager
    log_data = manager.get_log_data(manager.build_log_key_for_run(run_id, captured.file_key))
    [owner] = [r['owner'] for r in stack.executions(run_id) if r['step_key'] == 'ping']
    line = f'ping from worker {owner}'
    assert log_data.stdout is not None
    assert log_data.stdout.decode() == f'{line}\n'
    [worker] = [w for w in stack.workers if w.worker_id == owner]
    assert worker.log().count(line) == 1


def assert_health_and_metrics(port: int) -> None:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=5) as response:
        health = json.load(response)
    assert health['status'] == 'ok'
    assert (health['sqs_breaker'], health['db_breaker']) == ('closed', 'closed')
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as response:
        text = response.read().decode()
    assert metric(text, 'taskiq_steps_completed_total') >= 1
    assert metric(text, 'taskiq_steps_claimed_total') >= metric(
        text, 'taskiq_steps_completed_total'
    )
    assert 'taskiq_step_duration_seconds_bucket' in text


@pytest.mark.slow
def test_a_step_queued_too_long_fails_with_the_queue_and_worker_counts(
    stack: Stack, instance: DagsterInstance
) -> None:
    config = {
        'execution': {
            'config': {'check_step_health_interval_seconds': 1, 'step_queued_timeout_seconds': 1.0}
        }
    }
    ok, run_id = run(instance, 'fast_job', config)  # no worker is running
    assert not ok
    # the demo's RetryPolicy (2 retries) tries twice more before the step fails
    assert attempts(stack, run_id) == [('ping', n, 'CANCELLED') for n in range(3)]
    failures = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    [failure] = [record.event_log_entry.dagster_event for record in failures]
    message = failure.step_failure_data.error.message
    assert f'{run_id}:ping:2 waited' in message
    assert 'queue depth: 5 visible' in message  # attempt 0, and both copies of each retry
    assert 'live workers: 0' in message


@pytest.mark.slow
def test_a_worker_with_its_own_home_on_the_same_storage_runs_the_steps(
    stack: Stack, instance: DagsterInstance
) -> None:
    """A worker's DAGSTER_HOME is its own folder (as in its own container), with the run workers'
    storage: it is the same instance to a step, and the steps run against it."""
    home = stack.tmp_path / 'worker_home'
    home.mkdir()
    runs_home = Path(stack.env['DAGSTER_HOME'])
    (home / 'dagster.yaml').write_text((runs_home / 'dagster.yaml').read_text())
    [worker] = stack.start_workers(1, 2, env={'DAGSTER_HOME': str(home)})
    ok, run_id = run(instance, 'fast_job')
    assert ok
    assert {state for _, _, state in attempts(stack, run_id)} == {'COMPLETED'}
    assert {r['owner'] for r in stack.executions(run_id)} == {worker.worker_id}
    assert events(worker.log(), 'step_warm_up_failed') == []


@pytest.mark.slow
def test_a_step_runs_in_a_process_started_ahead_that_waited_longer_than_a_lease(
    stack: Stack, instance: DagsterInstance
) -> None:
    """After a step starts, the worker starts the next step's process (a spare); one that waits
    longer than the lease before its step arrives still runs it to the end."""
    [worker] = stack.start_workers(1, 1)
    idle = children(worker.process.pid)  # the forkserver and its helpers
    ok, _ = run(instance, 'fast_job')
    assert ok
    spares = wait_until(lambda: children(worker.process.pid) - idle, what='a spare')
    time.sleep(LEASE_S * 1.5)  # the scenario, not a synchronisation: the spare waits this long
    ok, run_id = run(instance, 'fast_job')
    assert ok
    started = [e for e in events(worker.log(), 'step_started') if e['run_id'] == run_id]
    assert [e['step_key'] for e in started] == ['ping', 'add_one', 'add_one_2']
    assert started[0]['pid'] in spares
