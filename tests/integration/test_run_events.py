"""The run worker's wake-up on the real PostgreSQL: a step end of its run, written by a worker's
fenced finish, ends the wait; another run's does not even reach it; a lost connection is made
again."""

import asyncio
import uuid

import psycopg
import pytest

from dagster_taskiq import run_events
from dagster_taskiq.run_events import RunEvents
from dagster_taskiq.store import Claimed, DagsterEventRow, StepState, Store
from tests.conftest import libpq_dsn

LONG_WAIT_S = 60.0  # a wait that ends before this was woken
EVENT = DagsterEventRow(event='{"entry": 1}', event_type='STEP_SUCCESS', timestamp=1_800_000_000.0)


async def finish_a_step(db: Store, run_id: str) -> None:
    """A worker's fenced finish of one attempt of `run_id`, with its terminal event."""
    key = f'{run_id}:step:0'
    assert await db.record_enqueued(key, run_id=run_id, job_name='job', step_key='step', attempt=0)
    claim = await db.claim(key, worker_id='w1', lease_s=30.0)
    assert isinstance(claim, Claimed)
    assert await db.finish(key, token=claim.token, outcome=StepState.COMPLETED, dagster_event=EVENT)


def unique_run_id() -> str:  # NOTIFY is database-wide: other tests' runs must not match
    return f'run-{uuid.uuid4()}'


async def test_a_step_end_of_the_run_wakes_the_wait(db: Store, database_url: str) -> None:
    run_id = unique_run_id()
    events = RunEvents(database_url, run_id)
    try:
        assert events.wait(0.0) is False  # listening from here on
        waiting = asyncio.ensure_future(asyncio.to_thread(events.wait, LONG_WAIT_S))
        await finish_a_step(db, unique_run_id())  # another run's
        await finish_a_step(db, run_id)
        assert await waiting is True
        assert events.wait(0.2) is False  # nothing more ended
    finally:
        events.close()


async def test_another_runs_step_end_never_reaches_the_listener(
    db: Store, database_url: str
) -> None:
    """Each run has a channel of its own: 50 run workers are not each woken for every step end
    of the other 49 runs."""
    events = RunEvents(database_url, unique_run_id())
    try:
        assert events.wait(0.0) is False
        await finish_a_step(db, unique_run_id())
        assert events.connection is not None
        assert list(events.connection.notifies(timeout=0.5, stop_after=1)) == []
    finally:
        events.close()


@pytest.mark.timeout(60)
async def test_a_lost_connection_is_made_again(db: Store, database_url: str) -> None:
    run_id = unique_run_id()
    events = RunEvents(database_url, run_id)
    try:
        assert events.wait(0.0) is False
        assert events.connection is not None
        listener_pid = events.connection.info.backend_pid
        with psycopg.connect(libpq_dsn(database_url), autocommit=True) as admin:
            admin.execute('SELECT pg_terminate_backend(%s)', (listener_pid,))
        assert events.wait(0.5) is False  # the error is logged, the timeout waited out
        assert events.connection is None
        # a new connection, once RECONNECT_AFTER_S has passed, hears the next step end
        while events.connection is None:
            events.wait(run_events.RECONNECT_AFTER_S / 5)
        assert events.connection.info.backend_pid != listener_pid
        waiting = asyncio.ensure_future(asyncio.to_thread(events.wait, LONG_WAIT_S))
        await finish_a_step(db, run_id)
        assert await waiting is True
    finally:
        events.close()
