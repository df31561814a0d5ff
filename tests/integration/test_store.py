"""The idempotency store on the real PostgreSQL: a stale token can change nothing."""

import asyncio
import re
from datetime import UTC

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from dagster_taskiq import store
from dagster_taskiq.errors import ConfigError, RunStopping, StoreUnavailable
from dagster_taskiq.resilience import CircuitBreaker
from dagster_taskiq.store import Claimed, DagsterEventRow, LeaseStatus, Refused, StepState, Store
from dagster_taskiq_demo.faultproxy import FaultProxy, Mode
from tests.conftest import libpq_dsn
from tests.waiting import eventually

KEY = 'run-1:compute[a.b]:0'
LONG_LEASE_S = 30.0
SHORT_LEASE_S = 0.3


async def enqueue(db: Store, key: str = KEY) -> None:
    run_id, step_key, attempt = key.rsplit(':', 2)
    assert await db.record_enqueued(
        key, run_id=run_id, job_name='job', step_key=step_key, attempt=int(attempt)
    )


async def claimed(db: Store, lease_s: float = LONG_LEASE_S, worker: str = 'w1') -> int:
    result = await db.claim(KEY, worker_id=worker, lease_s=lease_s)
    assert isinstance(result, Claimed), result
    return result.token


async def expired_claim(db: Store) -> int:
    token = await claimed(db, lease_s=SHORT_LEASE_S)

    async def lease_expired() -> bool:
        row = await db.get_execution(KEY)
        return row is not None and bool(row['lease_expired'])

    await eventually(lease_expired, what='lease expiry')
    return token


async def log_rows(db: Store) -> list[dict[str, object]]:
    return [dict(row) for row in await db.list_log('run-1')]


async def test_record_enqueued_is_idempotent(db: Store) -> None:
    await enqueue(db)
    again = await db.record_enqueued(
        KEY, run_id='run-1', job_name='job', step_key='compute[a.b]', attempt=0
    )
    assert again is False
    row = await db.get_execution(KEY)
    assert row is not None
    assert (row['state'], row['step_key'], row['attempt']) == ('QUEUED', 'compute[a.b]', 0)


@pytest.mark.timeout(60)
async def test_nothing_is_recorded_for_a_run_that_is_stopping(db: Store) -> None:
    async with db.engine.begin() as connection:  # Dagster's row of the run, as it marks it
        await connection.exec_driver_sql(
            'INSERT INTO runs (run_id, pipeline_name, run_body, status)'
            " VALUES ('run-1', 'job', '{}', 'CANCELING')"
        )
    with pytest.raises(RunStopping, match=f'run run-1 is CANCELING: {re.escape(KEY)} not'):
        await enqueue(db)
    assert await db.get_execution(KEY) is None


async def test_fifty_concurrent_claimers_one_winner(database_url: str, db: Store) -> None:
    await enqueue(db)
    wide_engine = create_async_engine(store.store_url(database_url), pool_size=50, max_overflow=0)
    wide = Store(wide_engine, CircuitBreaker(5, 30))
    try:
        results = await asyncio.gather(
            *(wide.claim(KEY, worker_id=f'w{i}', lease_s=LONG_LEASE_S) for i in range(50))
        )
    finally:
        await wide.close()
    winners = [result for result in results if isinstance(result, Claimed)]
    assert len(winners) == 1
    assert all(r.state is StepState.RUNNING for r in results if isinstance(r, Refused))
    row = await db.get_execution(KEY)
    assert row is not None
    assert (row['delivery_count'], row['refused_count'], row['lease_token']) == (
        50,
        49,
        winners[0].token,
    )
    assert len(await log_rows(db)) == 1


async def test_tokens_rise_with_every_claim(db: Store) -> None:
    tokens = []
    for attempt in range(3):
        key = f'run-1:step:{attempt}'
        await enqueue(db, key)
        result = await db.claim(key, worker_id='w1', lease_s=LONG_LEASE_S)
        assert isinstance(result, Claimed)
        tokens.append(result.token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


async def test_heartbeat_extends_the_lease(db: Store) -> None:
    await enqueue(db)
    token = await claimed(db, lease_s=1.0)
    before = await db.get_execution(KEY)
    assert await db.heartbeat(KEY, token=token, lease_s=60.0) is LeaseStatus.RENEWED
    after = await db.get_execution(KEY)
    assert before is not None and after is not None
    assert after['lease_expires_at'] > before['lease_expires_at']


async def test_finish_is_fenced_and_happens_once(db: Store) -> None:
    await enqueue(db)
    token = await claimed(db)
    assert not await db.finish(KEY, token=token + 1000, outcome=StepState.COMPLETED)
    assert await db.finish(KEY, token=token, outcome=StepState.COMPLETED)
    assert not await db.finish(KEY, token=token, outcome=StepState.FAILED, error='x')
    row = await db.get_execution(KEY)
    assert row is not None and row['state'] == 'COMPLETED'
    assert [(r['outcome'], r['lease_token']) for r in await log_rows(db)] == [('COMPLETED', token)]
    with pytest.raises(ValueError, match='COMPLETED or FAILED'):
        await db.finish(KEY, token=token, outcome=StepState.ABANDONED)


EVENT = DagsterEventRow(event='{"entry": 1}', event_type='STEP_SUCCESS', timestamp=1_800_000_000.25)


async def event_log(db: Store) -> list[dict[str, object]]:
    async with db.engine.connect() as connection:
        rows = await connection.exec_driver_sql(
            'SELECT run_id, step_key, dagster_event_type, event, timestamp FROM event_logs'
        )
        return [dict(row._mapping) for row in rows]


async def test_only_the_finish_that_wins_writes_the_terminal_event_and_effects(
    db: Store, database_url: str
) -> None:
    """The attempt's Dagster event and effects commit with its fenced finish, or not at all."""
    await enqueue(db)
    token = await expired_claim(db)
    assert await db.abandon(KEY, token=token) is not None
    effects = [{'name': 'row', 'payload': {'n': 1}}]
    assert not await db.finish(
        KEY, token=token, outcome=StepState.COMPLETED, effects=effects, dagster_event=EVENT
    )
    assert await event_log(db) == [] and await db.list_effects('run-1') == []

    retry = 'run-1:compute[a.b]:1'
    await enqueue(db, retry)
    won = await db.claim(retry, worker_id='w2', lease_s=LONG_LEASE_S)
    assert isinstance(won, Claimed)
    async with await psycopg.AsyncConnection.connect(
        libpq_dsn(database_url), autocommit=True
    ) as listener:
        await listener.execute('LISTEN run_events')
        assert await db.finish(
            retry,
            token=won.token,
            outcome=StepState.COMPLETED,
            effects=effects,
            dagster_event=EVENT,
        )
        notice = await anext(listener.notifies(timeout=5))
    [written] = await event_log(db)
    assert {k: v for k, v in written.items() if k != 'timestamp'} == {
        'run_id': 'run-1',
        'step_key': 'compute[a.b]',
        'dagster_event_type': 'STEP_SUCCESS',
        'event': '{"entry": 1}',
    }
    assert written['timestamp'].replace(tzinfo=UTC).timestamp() == EVENT['timestamp']
    assert notice.payload.startswith('run-1_')
    assert [(e['idempotency_key'], e['payload']) for e in await db.list_effects('run-1')] == [
        (retry, {'n': 1})
    ]


async def test_failed_outcome_keeps_its_error(db: Store) -> None:
    await enqueue(db)
    token = await claimed(db)
    assert await db.finish(KEY, token=token, outcome=StepState.FAILED, error='boom')
    row = await db.get_execution(KEY)
    assert row is not None and (row['state'], row['error']) == ('FAILED', 'boom')


async def test_expired_lease_is_abandoned_exactly_once_and_old_owner_is_fenced(
    db: Store,
) -> None:
    await enqueue(db)
    token = await expired_claim(db)
    reasons = await asyncio.gather(*(db.abandon(KEY, token=token) for _ in range(20)))
    done = [reason for reason in reasons if reason is not None]
    assert len(done) == 1
    assert 'worker w1' in done[0] and 'expired' in done[0]
    assert await db.heartbeat(KEY, token=token, lease_s=60) is LeaseStatus.LOST
    assert not await db.finish(KEY, token=token, outcome=StepState.COMPLETED)
    row = await db.get_execution(KEY)
    assert row is not None and row['state'] == 'ABANDONED'
    assert [r['outcome'] for r in await log_rows(db)] == ['ABANDONED']


async def test_live_lease_cannot_be_abandoned(db: Store) -> None:
    await enqueue(db)
    token = await claimed(db)
    assert await db.abandon(KEY, token=token) is None
    row = await db.get_execution(KEY)
    assert row is not None and row['state'] == 'RUNNING'


async def test_abandon_needs_the_current_token(db: Store) -> None:
    await enqueue(db)
    token = await expired_claim(db)
    assert await db.abandon(KEY, token=token - 1) is None
    assert await db.abandon(KEY, token=token) is not None


async def test_an_expired_lease_is_never_taken_over(db: Store) -> None:
    await enqueue(db)
    await expired_claim(db)
    result = await db.claim(KEY, worker_id='w2', lease_s=LONG_LEASE_S)
    assert result == Refused(
        state=StepState.RUNNING,
        owner='w1',
        token=result.token,
        lease_expired=True,
        abandonable=True,  # this store's grace is 0
    )
    assert len(await log_rows(db)) == 1


@pytest.mark.parametrize('state', ['RUNNING', 'COMPLETED', 'ABANDONED', 'CANCELLED'])
async def test_delivery_of_a_key_that_is_not_queued_is_refused_and_counted(
    db: Store, state: str
) -> None:
    await enqueue(db)
    if state == 'CANCELLED':
        assert await db.cancel(KEY)
    elif state == 'ABANDONED':
        assert await db.abandon(KEY, token=await expired_claim(db)) is not None
    else:
        token = await claimed(db)
        if state == 'COMPLETED':
            assert await db.finish(KEY, token=token, outcome=StepState.COMPLETED)
    logged = len(await log_rows(db))
    for delivery in range(3):
        result = await db.claim(KEY, worker_id='w2', lease_s=LONG_LEASE_S)
        assert isinstance(result, Refused) and result.state == state
        row = await db.get_execution(KEY)
        assert row is not None and row['refused_count'] == delivery + 1
    assert len(await log_rows(db)) == logged


async def test_unknown_key_is_refused_without_a_state(db: Store) -> None:
    assert await db.claim('nope:x:0', worker_id='w1', lease_s=1) == Refused(state=None)


async def test_cancel_reaches_the_owner_at_its_heartbeat(db: Store) -> None:
    await enqueue(db)
    token = await claimed(db)
    assert await db.cancel(KEY)
    assert await db.heartbeat(KEY, token=token, lease_s=60) is LeaseStatus.CANCELLED
    assert await db.heartbeat(KEY, token=token + 1, lease_s=60) is LeaseStatus.LOST
    assert not await db.finish(KEY, token=token, outcome=StepState.COMPLETED)
    assert not await db.cancel(KEY)
    assert [r['outcome'] for r in await log_rows(db)] == ['CANCELLED']


async def test_cancelled_queued_attempt_never_starts(db: Store) -> None:
    await enqueue(db)
    assert await db.cancel(KEY)
    result = await db.claim(KEY, worker_id='w1', lease_s=LONG_LEASE_S)
    assert isinstance(result, Refused) and result.state is StepState.CANCELLED
    assert await log_rows(db) == []


async def test_list_executions_of_a_run(db: Store) -> None:
    for key in ('run-1:a:0', 'run-1:b:0', 'run-2:a:0'):
        await enqueue(db, key)
    rows = await db.list_executions('run-1')
    assert sorted(row['idempotency_key'] for row in rows) == ['run-1:a:0', 'run-1:b:0']


def test_upgrade_is_repeatable_and_keeps_its_own_version_table(database_url: str) -> None:
    store.upgrade(database_url)
    store.upgrade(database_url)
    schema = database_url.split('search_path%3D')[-1]
    dsn = database_url.split('?')[0]
    with psycopg.connect(dsn) as connection:
        tables = {
            row[0]
            for row in connection.execute(
                'SELECT table_name FROM information_schema.tables WHERE table_schema = %s',
                (schema,),
            )
        }
    assert tables == {
        'step_executions',
        'execution_log',
        'step_effects',
        'workers',
        'scaling_events',
        'dagster_taskiq_alembic_version',
    }


def test_database_url_must_be_postgresql() -> None:
    with pytest.raises(ConfigError, match='PostgreSQL'):
        store.store_url('mysql://root@localhost/test')
    with pytest.raises(ConfigError, match='bad database URL'):
        store.store_url('not a url')


async def test_unreachable_database_is_a_store_error() -> None:
    unreachable = Store.connect('postgresql://postgres@127.0.0.1:1/test')
    try:
        with pytest.raises(StoreUnavailable, match='database unreachable'):
            await unreachable.get_execution(KEY)
    finally:
        await unreachable.close()


async def test_an_expired_lease_is_abandoned_only_after_the_grace(
    db: Store, database_url: str
) -> None:
    graceful = Store.connect(database_url, abandon_grace_s=2.0)
    try:
        await enqueue(graceful)
        token = await claimed(graceful, lease_s=0.0)  # expired at once
        row = await graceful.get_execution(KEY)
        assert row is not None and row['lease_expired'] and not row['abandonable']
        # within the grace its owner may still be stopping the step: nobody abandons it yet
        assert await graceful.abandon(KEY, token=token) is None
        refused = await graceful.claim(KEY, worker_id='w2', lease_s=LONG_LEASE_S)
        assert isinstance(refused, Refused) and refused.lease_expired and not refused.abandonable

        async def abandonable() -> bool:
            row = await graceful.get_execution(KEY)
            return row is not None and bool(row['abandonable'])

        await eventually(abandonable, what='the grace over')
        assert await graceful.abandon(KEY, token=token) is not None
    finally:
        await graceful.close()


async def test_a_call_the_database_never_answers_is_bounded(db: Store, database_url: str) -> None:
    with FaultProxy('127.0.0.1', make_url(database_url).port or 5432) as proxy:
        proxied = make_url(database_url).set(host='127.0.0.1', port=proxy.port)
        cut = Store.connect(proxied.render_as_string(False), call_timeout_s=0.5)
        try:
            assert await cut.get_execution(KEY) is None  # connected, through the proxy
            proxy.set_mode(Mode.DROP)
            with pytest.raises(StoreUnavailable, match=r'did not answer within 0\.5 s'):
                await cut.get_execution(KEY)
            assert cut.breaker.failures == 1
        finally:
            proxy.set_mode(Mode.RESET)
            await cut.close()


async def test_a_cancel_racing_a_claim_never_leaves_a_log_row_open(db: Store) -> None:
    """A claim commits while a cancel waits on its row lock: the cancel must still close the
    start the claim logged, which is not in the cancel's first snapshot."""
    await enqueue(db)
    async with db.engine.connect() as claiming:
        transaction = await claiming.begin()
        params = {'key': KEY, 'worker_id': 'w1', 'lease_s': LONG_LEASE_S}
        await claiming.execute(store.QUERIES['claim'], params)  # row locked, start logged
        cancelling = asyncio.create_task(db.cancel(KEY, reason='run terminated'))

        async def cancel_waits_on_the_lock() -> bool:
            async with db.engine.connect() as watcher:
                waiting = await watcher.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%CANCELLED%%'"
                )
                return bool(waiting.scalar())

        await eventually(cancel_waits_on_the_lock, what='the cancel blocked by the claim')
        await transaction.commit()
    assert await cancelling
    [row] = await db.list_executions('run-1')
    assert row['state'] == 'CANCELLED'
    assert [(r['outcome'], r['ended_at'] is not None) for r in await log_rows(db)] == [
        ('CANCELLED', True)
    ]


async def test_cancel_run_stops_what_is_queued_or_running_and_closes_its_starts(db: Store) -> None:
    for key in ('run-1:queued:0', 'run-1:running:0', 'run-1:done:0', 'run-2:other:0'):
        await enqueue(db, key)
    for key in ('run-1:running:0', 'run-1:done:0'):
        assert isinstance(await db.claim(key, worker_id='w1', lease_s=LONG_LEASE_S), Claimed)
    [done] = [r for r in await db.list_executions('run-1') if r['step_key'] == 'done']
    assert await db.finish(
        done['idempotency_key'], token=done['lease_token'], outcome=StepState.COMPLETED
    )
    assert await db.cancel_run('run-1', reason='run terminated') == 2
    states = {r['step_key']: r['state'] for r in await db.list_executions('run-1')}
    assert states == {'queued': 'CANCELLED', 'running': 'CANCELLED', 'done': 'COMPLETED'}
    assert {(r['step_key'], r['outcome']) for r in await log_rows(db)} == {
        ('running', 'CANCELLED'),
        ('done', 'COMPLETED'),
    }
    [other] = await db.list_executions('run-2')
    assert other['state'] == 'QUEUED'


async def test_closing_the_store_ends_a_call_it_let_go(db: Store, database_url: str) -> None:
    """A call cancelled while the database works on it must not outlive `close()`: its
    connection, and the transaction on it, would hold locks nobody can release."""
    await enqueue(db)
    token = await claimed(db)
    other = Store.connect(database_url)
    async with db.engine.connect() as blocking:
        transaction = await blocking.begin()
        await blocking.execute(
            store.QUERIES['heartbeat'], {'key': KEY, 'token': token, 'lease_s': 1}
        )
        heartbeat = asyncio.create_task(other.heartbeat(KEY, token=token, lease_s=LONG_LEASE_S))

        blocked: list[int] = []  # the pid of the heartbeat's backend

        async def heartbeat_blocked() -> bool:
            async with db.engine.connect() as watcher:
                found = await watcher.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                blocked[:] = found.scalars().all()
                return bool(blocked)

        await eventually(heartbeat_blocked, what='the heartbeat blocked on the row lock')
        heartbeat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await heartbeat  # as a stopping worker awaits its cancelled tasks before closing
        await other.close()
        async with db.engine.connect() as watcher:
            found = await watcher.exec_driver_sql(
                f'SELECT state FROM pg_stat_activity WHERE pid = {blocked[0]}'
            )
            assert found.scalar() in (None, 'idle'), 'the call let go still runs on the server'
        await transaction.rollback()
