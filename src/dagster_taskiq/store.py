"""The idempotency store: each step attempt key is executed at most once.

`claim` is one atomic statement that wins only for a QUEUED key and returns a fencing token; every
later write (heartbeat, finish) carries that token and is refused once it is stale. A lease that
expires is never taken over: `abandon` marks the attempt ABANDONED (fenced on the expired token) and
Dagster retries the step under a new key. The SQL lives in sql/queries.sql.
"""

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, RowMapping, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dagster_taskiq.errors import ConfigError, StoreUnavailable
from dagster_taskiq.sql import MIGRATIONS_DIR, load_queries

QUERIES = {name: text(sql) for name, sql in load_queries().items()}
_POSTGRES_DRIVERS = {'postgres', 'postgresql', 'postgresql+psycopg', 'postgresql+psycopg2'}


class StepState(StrEnum):
    QUEUED = 'QUEUED'
    RUNNING = 'RUNNING'
    COMPLETED = 'COMPLETED'
    FAILED = 'FAILED'
    ABANDONED = 'ABANDONED'
    CANCELLED = 'CANCELLED'


class LeaseStatus(StrEnum):
    RENEWED = 'RENEWED'
    CANCELLED = 'CANCELLED'  # terminated through Dagster: the owner must interrupt the step
    LOST = 'LOST'  # the token is stale (abandoned, finished, or never ours): stop, write nothing


@dataclass(frozen=True)
class Claimed:
    token: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class Refused:
    """Why a delivery did not win its claim; `state` is None for a key the store has never seen."""

    state: StepState | None
    owner: str | None = None
    token: int | None = None
    lease_expired: bool = False


def store_url(database_url: str) -> URL:
    """`database_url` with the psycopg 3 driver, which serves both the sync and the async engine."""
    try:
        url = make_url(database_url)
    except sqlalchemy.exc.ArgumentError as error:
        raise ConfigError(f'bad database URL {database_url!r}: {error}') from error
    if url.drivername not in _POSTGRES_DRIVERS:
        raise ConfigError(f'database URL must be PostgreSQL, not {url.drivername!r}')
    return url.set(drivername='postgresql+psycopg')


def async_engine(database_url: str) -> AsyncEngine:
    return create_async_engine(store_url(database_url), pool_pre_ping=True)


def sync_engine(database_url: str) -> Engine:
    return create_engine(store_url(database_url), pool_pre_ping=True)


def upgrade(database_url: str) -> None:
    """Apply every pending migration (what `dagster-taskiq db upgrade` runs)."""
    config = Config()
    config.set_main_option('script_location', str(MIGRATIONS_DIR))
    engine = sync_engine(database_url)
    try:
        with engine.begin() as connection:
            config.attributes['connection'] = connection
            command.upgrade(config, 'head')
    finally:
        engine.dispose()


@asynccontextmanager
async def _transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    try:
        async with engine.begin() as connection:
            yield connection
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as error:
        raise StoreUnavailable(f'database unreachable: {error.orig or error}') from error


async def _first(engine: AsyncEngine, query: str, **params: Any) -> RowMapping | None:
    async with _transaction(engine) as connection:
        result = await connection.execute(QUERIES[query], params)
        return result.mappings().first()


async def _all(engine: AsyncEngine, query: str, **params: Any) -> Sequence[RowMapping]:
    async with _transaction(engine) as connection:
        result = await connection.execute(QUERIES[query], params)
        return result.mappings().all()


async def record_enqueued(
    engine: AsyncEngine, key: str, *, run_id: str, job_name: str, step_key: str, attempt: int
) -> bool:
    """Insert the QUEUED row; False when the key was already recorded (nothing changes then)."""
    row = await _first(
        engine,
        'record_enqueued',
        key=key,
        run_id=run_id,
        job_name=job_name,
        step_key=step_key,
        attempt=attempt,
    )
    return row is not None


async def claim(
    engine: AsyncEngine, key: str, *, worker_id: str, lease_s: float
) -> Claimed | Refused:
    """Win the key for `worker_id` if it is QUEUED; otherwise count the delivery and say why not."""
    row = await _first(engine, 'claim', key=key, worker_id=worker_id, lease_s=lease_s)
    if row is not None:
        return Claimed(token=row['lease_token'], lease_expires_at=row['lease_expires_at'])
    row = await _first(engine, 'refuse', key=key)
    if row is None:
        return Refused(state=None)
    return Refused(
        state=StepState(row['state']),
        owner=row['owner'],
        token=row['lease_token'],
        lease_expired=bool(row['lease_expired']),
    )


async def heartbeat(engine: AsyncEngine, key: str, *, token: int, lease_s: float) -> LeaseStatus:
    """Extend the lease of the holder of `token`; CANCELLED or LOST when it may not go on."""
    if await _first(engine, 'heartbeat', key=key, token=token, lease_s=lease_s) is not None:
        return LeaseStatus.RENEWED
    row = await get_execution(engine, key)
    if row is not None and row['lease_token'] == token and row['state'] == StepState.CANCELLED:
        return LeaseStatus.CANCELLED
    return LeaseStatus.LOST


async def finish(
    engine: AsyncEngine,
    key: str,
    *,
    token: int,
    outcome: StepState,
    error: str | None = None,
    effects: Sequence[Mapping[str, Any]] = (),
) -> bool:
    """Record COMPLETED or FAILED for the holder of `token`; False when the token is stale.

    `effects` (name, payload) are written in the same transaction, and only if this call wins.
    """
    if outcome not in (StepState.COMPLETED, StepState.FAILED):
        raise ValueError(f'an attempt finishes COMPLETED or FAILED, not {outcome}')
    async with _transaction(engine) as connection:
        params = {'key': key, 'token': token, 'outcome': str(outcome), 'error': error}
        finished = (await connection.execute(QUERIES['finish'], params)).first() is not None
        if finished and effects:
            await connection.execute(
                QUERIES['insert_effect'],
                [
                    {'key': key, 'name': effect['name'], 'payload': json.dumps(effect['payload'])}
                    for effect in effects
                ],
            )
        return finished


async def abandon(engine: AsyncEngine, key: str, *, token: int) -> str | None:
    """Mark a RUNNING attempt whose lease (held with `token`) has expired ABANDONED.

    Returns the recorded reason (naming the lost worker) when this call did it, else None: the
    lease is live, the token is stale, or someone else abandoned it first.
    """
    row = await _first(engine, 'abandon', key=key, token=token)
    return None if row is None else str(row['error'])


async def expire_lease(engine: AsyncEngine, key: str, *, token: int) -> bool:
    """End the lease of the holder of `token` now, so the attempt can be abandoned and retried."""
    return await _first(engine, 'expire_lease', key=key, token=token) is not None


async def cancel(
    engine: AsyncEngine, key: str, *, reason: str = 'cancelled', only_queued: bool = False
) -> bool:
    """Mark a QUEUED (or RUNNING) attempt CANCELLED; an owner sees it at its next heartbeat."""
    states = ['QUEUED'] if only_queued else ['QUEUED', 'RUNNING']
    return await _first(engine, 'cancel', key=key, reason=reason, states=states) is not None


async def get_execution(engine: AsyncEngine, key: str) -> RowMapping | None:
    """The attempt's row, with computed `lease_expired` and `age_s`, or None for an unknown key."""
    return await _first(engine, 'get_execution', key=key)


async def list_executions(engine: AsyncEngine, run_id: str) -> Sequence[RowMapping]:
    return await _all(engine, 'list_executions', run_id=run_id)


async def list_effects(engine: AsyncEngine, run_id: str) -> Sequence[RowMapping]:
    return await _all(engine, 'list_effects', run_id=run_id)


async def worker_seen(
    engine: AsyncEngine, worker_id: str, *, concurrency: int, running: int
) -> None:
    """Register or refresh a live worker (it calls this every heartbeat interval)."""
    async with _transaction(engine) as connection:
        await connection.execute(
            QUERIES['worker_seen'],
            {'worker_id': worker_id, 'concurrency': concurrency, 'running': running},
        )


async def worker_stopped(engine: AsyncEngine, worker_id: str) -> None:
    async with _transaction(engine) as connection:
        await connection.execute(QUERIES['worker_stopped'], {'worker_id': worker_id})


async def live_workers(engine: AsyncEngine, within_s: float) -> RowMapping:
    """Workers seen within `within_s`: their count, slots and running steps."""
    row = await _first(engine, 'live_workers', within_s=within_s)
    assert row is not None  # an aggregate always returns a row
    return row


async def record_scaling_event(engine: AsyncEngine, **event: object) -> None:
    """One auto-scaler decision: cluster, service, the inputs, the desired count and why."""
    async with _transaction(engine) as connection:
        await connection.execute(QUERIES['record_scaling_event'], event)


async def list_scaling_events(engine: AsyncEngine, service: str) -> Sequence[RowMapping]:
    return await _all(engine, 'list_scaling_events', service=service)


async def list_log(engine: AsyncEngine, run_id: str) -> Sequence[RowMapping]:
    """`execution_log` rows of a run: one per start of an attempt, duplicates included."""
    return await _all(engine, 'list_log', run_id=run_id)
