"""Outcomes journaled while the database is unreachable are written when it returns."""

from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from dagster_taskiq import journal, store
from dagster_taskiq.errors import StoreUnavailable
from dagster_taskiq.store import Claimed, StepState

UNREACHABLE_URL = 'postgresql://postgres@127.0.0.1:1/test'


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def claimed_attempt(engine: AsyncEngine, key: str) -> int:
    run_id, step_key, attempt = key.split(':')
    await store.record_enqueued(
        engine, key, run_id=run_id, job_name='job', step_key=step_key, attempt=int(attempt)
    )
    claim = await store.claim(engine, key, worker_id='w1', lease_s=30)
    assert isinstance(claim, Claimed)
    return claim.token


async def test_journaled_outcomes_are_reconciled_once_the_database_is_back(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    done = journal.Entry(
        key='run-1:a:0',
        token=await claimed_attempt(engine, 'run-1:a:0'),
        outcome=StepState.COMPLETED,
        effects=[{'name': 'row', 'payload': {'n': 1}}],
    )
    failed = journal.Entry(
        key='run-1:b:0',
        token=await claimed_attempt(engine, 'run-1:b:0'),
        outcome=StepState.FAILED,
        error='boom',
    )
    stale = journal.Entry(key='run-1:c:0', token=1, outcome=StepState.COMPLETED)
    await claimed_attempt(engine, 'run-1:c:0')

    down = store.async_engine(UNREACHABLE_URL)
    try:
        for entry in (done, failed, stale):
            with pytest.raises(StoreUnavailable):
                await journal.write(down, entry)
            journal.append(tmp_path, 'w1', entry)
        with pytest.raises(StoreUnavailable):
            await journal.reconcile(tmp_path, 'w2', down)
    finally:
        await down.dispose()
    assert files(tmp_path) == ['journal-w2.jsonl']  # kept, not lost

    assert await journal.reconcile(tmp_path, 'w3', engine) == 3
    assert files(tmp_path) == []
    rows = {row['idempotency_key']: row for row in await store.list_executions(engine, 'run-1')}
    assert (rows['run-1:a:0']['state'], rows['run-1:b:0']['state']) == ('COMPLETED', 'FAILED')
    assert rows['run-1:b:0']['error'] == 'boom'
    assert rows['run-1:c:0']['state'] == 'RUNNING'  # a stale token changed nothing
    effects = await store.list_effects(engine, 'run-1')
    assert [(e['step_key'], e['payload']) for e in effects] == [('a', {'n': 1})]
