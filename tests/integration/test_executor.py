"""The executor's step handler on the real store: what a launch leaves behind when SQS fails; a
health check round's reads."""

import uuid
from typing import Any

import pytest
import sqlalchemy

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


def test_a_health_check_round_reads_every_step_in_flight_in_one_query(
    db: Store, database_url: str
) -> None:
    """Dagster checks each running step in turn: for a run whose 3 steps wait in the queue, the
    store answers the round with one query, and each check gets its own step's row."""
    handler = SqsStepHandler(Settings(database_url=database_url))
    run_id = str(uuid.uuid4())
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    try:
        for step in ('a', 'b', 'c'):
            key = message.attempt_key(run_id, step, 0)
            handler._run(
                handler._store.record_enqueued(
                    key, run_id=run_id, job_name='job', step_key=step, attempt=0
                )
            )
            handler.in_flight[step] = key
        sqlalchemy.event.listen(handler._store.engine.sync_engine, 'before_cursor_execute', count)
        checked = [handler._run(handler._health(key)) for key in handler.in_flight.values()]
    finally:
        handler.close()
    assert [(reason, row and row['idempotency_key']) for reason, row in checked] == [
        (None, key) for key in handler.in_flight.values()
    ]
    assert len(statements) == 1
