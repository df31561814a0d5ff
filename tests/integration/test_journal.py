"""Outcomes journaled while the database is unreachable are written when it returns."""

from pathlib import Path

import pytest

from dagster_taskiq import journal
from dagster_taskiq.errors import StoreUnavailable
from dagster_taskiq.store import Claimed, StepState, Store

UNREACHABLE_URL = 'postgresql://postgres@127.0.0.1:1/test'


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def claimed_attempt(db: Store, key: str) -> int:
    run_id, step_key, attempt = key.split(':')
    await db.record_enqueued(
        key, run_id=run_id, job_name='job', step_key=step_key, attempt=int(attempt)
    )
    claim = await db.claim(key, worker_id='w1', lease_s=30)
    assert isinstance(claim, Claimed)
    return claim.token


async def test_journaled_outcomes_are_reconciled_once_the_database_is_back(
    db: Store, tmp_path: Path
) -> None:
    done = journal.Entry(
        key='run-1:a:0',
        token=await claimed_attempt(db, 'run-1:a:0'),
        outcome=StepState.COMPLETED,
        effects=[{'name': 'row', 'payload': {'n': 1}}],
    )
    failed = journal.Entry(
        key='run-1:b:0',
        token=await claimed_attempt(db, 'run-1:b:0'),
        outcome=StepState.FAILED,
        error='boom',
    )
    stale = journal.Entry(key='run-1:c:0', token=1, outcome=StepState.COMPLETED)
    await claimed_attempt(db, 'run-1:c:0')

    down = Store.connect(UNREACHABLE_URL)
    try:
        for entry in (done, failed, stale):
            with pytest.raises(StoreUnavailable):
                await journal.write(down, entry)
            journal.append(tmp_path, 'w1', entry)
        with pytest.raises(StoreUnavailable):
            await journal.reconcile(tmp_path, 'w2', down)
    finally:
        await down.close()
    assert files(tmp_path) == ['journal-w2.jsonl']  # kept, not lost

    assert await journal.reconcile(tmp_path, 'w3', db) == 3
    assert files(tmp_path) == []
    rows = {row['idempotency_key']: row for row in await db.list_executions('run-1')}
    assert (rows['run-1:a:0']['state'], rows['run-1:b:0']['state']) == ('COMPLETED', 'FAILED')
    assert rows['run-1:b:0']['error'] == 'boom'
    assert rows['run-1:c:0']['state'] == 'RUNNING'  # a stale token changed nothing
    effects = await db.list_effects('run-1')
    assert [(e['step_key'], e['payload']) for e in effects] == [('a', {'n': 1})]
