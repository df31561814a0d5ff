"""The executor's step handler on the real store: what a launch leaves behind when SQS fails."""

import uuid

import pytest

from dagster_taskiq import message
from dagster_taskiq.errors import TransportError
from dagster_taskiq.executor import SqsStepHandler
from dagster_taskiq.settings import Settings
from dagster_taskiq.store import StepState, Store
from tests.one_op import step_args


def test_a_message_that_cannot_be_sent_leaves_its_attempt_cancelled_not_queued(
    db: Store, database_url: str
) -> None:
    settings = Settings(
        database_url=database_url,
        aws_endpoint_url='http://127.0.0.1:1',  # nothing listens: every SQS call fails
        queue_name=f'never-{uuid.uuid4().hex[:8]}',
        retry_attempts=1,
    )
    args = step_args(uuid.uuid4().hex)
    task = message.build_task(args, job_name='one_op_job', enqueued_at=0.0)
    handler = SqsStepHandler(settings)
    try:
        with pytest.raises(TransportError):
            handler._run(handler._enqueue(task))
        row = handler._run(handler._store.get_execution(task.idempotency_key))
    finally:
        handler.close()
    assert row is not None and row['state'] == StepState.CANCELLED
    assert row['error'].startswith('its message could not be sent: ')
