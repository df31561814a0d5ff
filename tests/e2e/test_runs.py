"""Real Dagster runs through real worker subprocesses: every demo job ends as it should."""

from collections import Counter

import boto3
import pytest
from dagster import DagsterEventType, DagsterInstance

from tests.e2e.conftest import Stack, attempts, run


def step_starts(instance: DagsterInstance, run_id: str) -> Counter[str]:
    """Starts of each step in Dagster's event log, one per attempt (a retry is STEP_RESTARTED)."""
    of_type = {DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED}
    records = instance.get_records_for_run(run_id, of_type=of_type).records
    return Counter(record.event_log_entry.step_key for record in records)


@pytest.mark.slow
def test_demo_jobs_end_as_expected(stack: Stack, instance: DagsterInstance) -> None:
    stack.start_workers(2, 4)

    ok, run_id = run(instance, 'fast_job')
    assert ok
    assert step_starts(instance, run_id) == {'ping': 1, 'add_one': 1, 'add_one_2': 1}
    assert attempts(stack, run_id) == [
        ('add_one', 0, 'COMPLETED'),
        ('add_one_2', 0, 'COMPLETED'),
        ('ping', 0, 'COMPLETED'),
    ]
    assert len(stack.log_rows(run_id)) == 3

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
