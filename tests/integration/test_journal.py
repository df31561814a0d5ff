"""Outcomes journaled while the database is unreachable are written when it returns."""

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from dagster_taskiq import journal
from dagster_taskiq.errors import ConfigError, StoreUnavailable
from dagster_taskiq.logs import get_logger
from dagster_taskiq.store import Claimed, StepState, Store
from tests.waiting import eventually

UNREACHABLE_URL = 'postgresql://postgres@127.0.0.1:1/test'
log = get_logger(__name__)


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
    first = journal.Journal(tmp_path, 'w1', log)
    first.open()
    try:
        for entry in (done, failed, stale):
            with pytest.raises(StoreUnavailable):
                await journal.write(down, entry)
            first.append(entry)
        with pytest.raises(StoreUnavailable):
            await first.reconcile(down)
    finally:
        await down.close()
    assert files(tmp_path) == ['journal-w1.jsonl', 'journal-w1.lock']  # kept, not lost
    first.close()  # w1 is gone: any worker on the folder takes its journal over

    second = journal.Journal(tmp_path, 'w2', log)
    second.open()
    assert await second.reconcile(db) == journal.Reconciled(written=3)
    assert files(tmp_path) == ['journal-w2.lock']
    rows = {row['idempotency_key']: row for row in await db.list_executions('run-1')}
    assert (rows['run-1:a:0']['state'], rows['run-1:b:0']['state']) == ('COMPLETED', 'FAILED')
    assert rows['run-1:b:0']['error'] == 'boom'
    assert rows['run-1:c:0']['state'] == 'RUNNING'  # a stale token changed nothing
    effects = await db.list_effects('run-1')
    assert [(e['step_key'], e['payload']) for e in effects] == [('a', {'n': 1})]
    second.close()


async def test_a_live_workers_journal_is_left_to_it(db: Store, tmp_path: Path) -> None:
    owner = journal.Journal(tmp_path, 'w1', log)
    owner.open()
    entry = journal.Entry('run-1:a:0', await claimed_attempt(db, 'run-1:a:0'), StepState.COMPLETED)
    owner.append(entry)
    with pytest.raises(ConfigError, match='held by another live worker'):
        journal.Journal(tmp_path, 'w1', log).open()
    other = journal.Journal(tmp_path, 'w2', log)
    other.open()
    assert await other.reconcile(db) == journal.Reconciled()  # w1 holds its own
    assert await owner.reconcile(db) == journal.Reconciled(written=1)
    owner.close()
    other.close()


async def test_a_torn_line_and_an_unwritable_entry_are_set_aside_and_block_nothing(
    db: Store, tmp_path: Path
) -> None:
    """A worker killed mid-append leaves a torn line; an entry may hold what the database rejects
    or what no finish accepts. Each good outcome still lands; each bad one is set aside with its
    reason; a NUL (which PostgreSQL's text and jsonb cannot hold) is made storable."""
    nul = journal.Entry(
        'run-1:a:0',
        await claimed_attempt(db, 'run-1:a:0'),
        StepState.FAILED,
        error='bad\x00byte',
        effects=[{'name': 'row\x00', 'payload': {'text': 'a\x00b'}}],
    )
    good = journal.Entry('run-1:b:0', await claimed_attempt(db, 'run-1:b:0'), StepState.COMPLETED)
    never = journal.Entry('run-1:c:0', 1, StepState.ABANDONED)  # no finish records ABANDONED
    path = tmp_path / 'journal-w1.jsonl'
    path.write_text(
        '\n'.join(json.dumps(asdict(e)) for e in (nul, never))
        + '\n{"key": "run-1:d:0", "tok\n'  # the worker died in the middle of this append
        + json.dumps(asdict(good))
        + '\n'
    )
    reconciler = journal.Journal(tmp_path, 'w2', log)
    reconciler.open()
    assert await reconciler.reconcile(db) == journal.Reconciled(written=2, set_aside=2)
    rows = {row['idempotency_key']: row for row in await db.list_executions('run-1')}
    assert rows['run-1:a:0']['error'] == 'bad\ufffdbyte'
    assert rows['run-1:b:0']['state'] == 'COMPLETED'
    [effect] = await db.list_effects('run-1')
    assert (effect['name'], effect['payload']) == ('row\ufffd', {'text': 'a\ufffdb'})
    rejected = [
        json.loads(line)
        for line in (tmp_path / 'journal-w2.rejected.jsonl').read_text().splitlines()
    ]
    assert [r['reason'].split(':')[0] for r in rejected] == ['ValueError', 'JSONDecodeError']
    assert files(tmp_path) == ['journal-w2.lock', 'journal-w2.rejected.jsonl']
    reconciler.close()


async def test_an_outcome_appended_while_reconciling_is_kept(db: Store, tmp_path: Path) -> None:
    own = journal.Journal(tmp_path, 'w1', log)
    own.open()
    first = journal.Entry('run-1:a:0', await claimed_attempt(db, 'run-1:a:0'), StepState.COMPLETED)
    later = journal.Entry('run-1:b:0', await claimed_attempt(db, 'run-1:b:0'), StepState.COMPLETED)
    own.append(first)
    async with db.engine.connect() as blocking:  # holds first's row: its finish waits
        transaction = await blocking.begin()
        await blocking.exec_driver_sql(
            "SELECT 1 FROM step_executions WHERE idempotency_key = 'run-1:a:0' FOR UPDATE"
        )
        reconciling = asyncio.create_task(own.reconcile(db))

        async def finish_waits() -> bool:
            async with db.engine.connect() as watcher:
                waiting = await watcher.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                return bool(waiting.scalar())

        await eventually(finish_waits, what='the reconciling finish blocked')
        own.append(later)  # journaled while the reconcile is under way
        await transaction.rollback()
    assert await reconciling == journal.Reconciled(written=1)
    assert await own.reconcile(db) == journal.Reconciled(written=1)
    states = {row['idempotency_key']: row['state'] for row in await db.list_executions('run-1')}
    assert states == {'run-1:a:0': 'COMPLETED', 'run-1:b:0': 'COMPLETED'}
    own.close()
