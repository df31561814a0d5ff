"""The idempotency store: each step attempt key is executed at most once.

`claim` is one atomic statement that wins only for a QUEUED key and returns a fencing token; every
later write (heartbeat, finish) carries that token and is refused once it is stale. A lease that
expires is never taken over: `abandon` marks the attempt ABANDONED (fenced on the expired token) and
Dagster retries the step under a new key. The SQL lives in sql/queries.sql.

Alembic is imported only by the functions that migrate: step processes import this module
(through the executor of their code location) and never migrate.

`Store` owns its engine and a circuit breaker that counts every call (the journal's included): an
unreachable database shows as StoreUnavailable, and the breaker tells the worker to stop receiving.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypedDict, TypeVar

import sqlalchemy.exc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, RowMapping, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dagster_taskiq.defaults import (
    DEFAULT_ABANDON_GRACE_S,
    DEFAULT_BREAKER_COOLDOWN_S,
    DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_STORE_CALL_TIMEOUT_S,
)
from dagster_taskiq.errors import ConfigError, RunStopping, StoreUnavailable
from dagster_taskiq.resilience import CircuitBreaker
from dagster_taskiq.settings import Settings
from dagster_taskiq.sql import MIGRATIONS_DIR, VERSION_TABLE, load_queries

QUERIES = {name: text(sql) for name, sql in load_queries().items()}
T = TypeVar('T')
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


STOPPING_RUN_STATUSES = ('CANCELING', 'CANCELED')  # Dagster's, as its runs table spells them


class DagsterEventRow(TypedDict):
    """An attempt's terminal event for Dagster's event log, written with the attempt's finish."""

    event: str  # the serialized EventLogEntry, as dagster-postgres stores it
    event_type: str  # STEP_SUCCESS, STEP_FAILURE or STEP_UP_FOR_RETRY
    timestamp: float  # the entry's own, seconds since the epoch


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
    abandonable: bool = False  # expired more than the store's abandon grace ago


def store_url(database_url: str) -> URL:
    """`database_url` with the psycopg 3 driver, which serves both the sync and the async engine."""
    try:
        url = make_url(database_url)
    except sqlalchemy.exc.ArgumentError as error:
        raise ConfigError(f'bad database URL {database_url!r}: {error}') from error
    if url.drivername not in _POSTGRES_DRIVERS:
        raise ConfigError(f'database URL must be PostgreSQL, not {url.drivername!r}')
    return url.set(drivername='postgresql+psycopg')


# libpq's own bounds: a host that never answers fails the connect, and TCP keepalives find a peer
# that vanished under an idle pooled connection. A call's overall bound is Store.call_timeout_s.
CONNECT_ARGS = {
    'connect_timeout': 5,
    'keepalives': 1,
    'keepalives_idle': 10,
    'keepalives_interval': 5,
    'keepalives_count': 3,
}


def async_engine(database_url: str) -> AsyncEngine:
    return create_async_engine(
        store_url(database_url), pool_pre_ping=True, connect_args=CONNECT_ARGS
    )


def sync_engine(database_url: str) -> Engine:
    return create_engine(store_url(database_url), pool_pre_ping=True, connect_args=CONNECT_ARGS)


def upgrade(database_url: str) -> list[str]:
    """Apply every pending migration (what `dagster-taskiq db upgrade` runs).

    Returns the migrations applied, oldest first, as 'revision: title'; empty when up to date.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option('script_location', str(MIGRATIONS_DIR))
    engine = sync_engine(database_url)
    try:
        with engine.begin() as connection:
            migration = MigrationContext.configure(
                connection, opts={'version_table': VERSION_TABLE}
            )
            before = migration.get_current_revision()
            config.attributes['connection'] = connection
            command.upgrade(config, 'head')
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as error:
        raise StoreUnavailable(f'database unreachable: {error.orig or error}') from error
    finally:
        engine.dispose()
    applied = ScriptDirectory.from_config(config).iterate_revisions('heads', before)
    return [f'{r.revision}: {(r.doc or "").splitlines()[0]}' for r in reversed(list(applied))]


def storable(value: T) -> T:
    """`value` with every NUL character in its strings (keys too) replaced by U+FFFD: PostgreSQL's
    text and jsonb cannot hold NUL, and an outcome must not be refused for its error's bytes."""
    if isinstance(value, str):
        return value.replace('\x00', '\ufffd')  # type: ignore[return-value]
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]  # type: ignore[return-value]
    return value


def _event_params(dagster_event: DagsterEventRow | None) -> dict[str, Any]:
    if dagster_event is None:
        return {'event': None, 'event_type': None, 'event_timestamp': None}
    return {
        'event': dagster_event['event'],
        'event_type': dagster_event['event_type'],
        'event_timestamp': dagster_event['timestamp'],
    }


class Store:
    """The idempotency store on one async engine; every call is counted by `breaker`."""

    def __init__(
        self,
        engine: AsyncEngine,
        breaker: CircuitBreaker,
        *,
        call_timeout_s: float = DEFAULT_STORE_CALL_TIMEOUT_S,
        abandon_grace_s: float = DEFAULT_ABANDON_GRACE_S,
    ) -> None:
        self.engine = engine
        self._autocommit_engine = engine.execution_options(isolation_level='AUTOCOMMIT')
        self.breaker = breaker
        self.call_timeout_s = call_timeout_s  # no call waits longer (packets dropped, say)
        self.abandon_grace_s = abandon_grace_s  # an expired lease is abandoned this much later
        self._let_go_calls: set[asyncio.Task[Any]] = set()  # cancelled, not yet ended

    @classmethod
    def connect(
        cls, database_url: str, breaker: CircuitBreaker | None = None, **options: float
    ) -> 'Store':
        """A store on a new engine for `database_url` (a default breaker unless one is given)."""
        breaker = breaker or CircuitBreaker(DEFAULT_BREAKER_THRESHOLD, DEFAULT_BREAKER_COOLDOWN_S)
        return cls(async_engine(database_url), breaker, **options)

    @classmethod
    def from_settings(cls, settings: Settings) -> 'Store':
        return cls.connect(
            settings.database_url,
            CircuitBreaker.from_settings(settings),
            call_timeout_s=settings.store_call_timeout_s,
            abandon_grace_s=settings.abandon_grace_s,
        )

    async def close(self) -> None:
        """Close the engine once the calls let go have ended (within `call_timeout_s`).

        A call let go is still cancelling its statement on the server; disposing the engine
        under it would leave its connection, and any transaction open on it, behind.
        """
        if self._let_go_calls:
            await asyncio.wait(self._let_go_calls, timeout=self.call_timeout_s)
        await self.engine.dispose()

    def _let_go(self, task: 'asyncio.Task[Any]') -> None:
        """Cancel `task` without waiting for it; keep it referenced until it is done."""
        task.cancel()
        self._let_go_calls.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: 'asyncio.Task[Any]') -> None:
        self._let_go_calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller has long had its StoreUnavailable

    async def ping(self) -> None:
        """StoreUnavailable unless the database answers (within the call timeout)."""
        await self._first('ping')

    async def check_schema(self) -> None:
        """ConfigError unless every migration is applied (StoreUnavailable: no database)."""
        from alembic.script import ScriptDirectory

        upgrade_hint = 'run `dagster-taskiq db upgrade`'
        try:
            row = await self._first('schema_version')
        except sqlalchemy.exc.ProgrammingError as error:
            raise ConfigError(
                f'the idempotency store has no tables here: {upgrade_hint}'
            ) from error
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        current = row and row['version_num']
        if current != head:
            raise ConfigError(f'the store is at migration {current}, not {head}: {upgrade_hint}')

    async def check_dagster_storage(self) -> None:
        """ConfigError unless Dagster's PostgreSQL storage is in the store's database: a finish
        writes the attempt's terminal event to its event log, a launch reads its run's status."""
        row = await self._first('dagster_tables')
        missing = [table for table in ('event_logs', 'runs') if row is None or row[table] is None]
        if missing:
            raise ConfigError(
                f"Dagster's storage (table {', '.join(missing)}) is not in the store's database: "
                "the store must be in the database of Dagster's PostgreSQL storage, where each "
                "attempt's terminal event is written with its finish"
            )

    async def _run(
        self, work: Callable[[AsyncConnection], Awaitable[T]], *, autocommit: bool = False
    ) -> T:
        """`work` in one transaction (each statement its own with `autocommit`), answered within
        `call_timeout_s` or StoreUnavailable.

        The transaction runs as a task of its own, which a timeout (or the caller's own
        cancellation) cancels without waiting for: psycopg's cancellation waits for the server to
        acknowledge it, which a link that drops packets never does.
        """
        engine = self._autocommit_engine if autocommit else self.engine

        async def transaction() -> T:
            async with engine.begin() as connection:
                return await work(connection)

        task = asyncio.ensure_future(transaction())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.call_timeout_s)
        except asyncio.CancelledError:
            self._let_go(task)
            raise
        if not done:
            self._let_go(task)
            self.breaker.record_failure()
            raise StoreUnavailable(f'database did not answer within {self.call_timeout_s} s')
        try:
            result = task.result()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as error:
            self.breaker.record_failure()
            raise StoreUnavailable(f'database unreachable: {error.orig or error}') from error
        self.breaker.record_success()
        return result

    async def _first(self, query: str, **params: Any) -> RowMapping | None:
        async def first(connection: AsyncConnection) -> RowMapping | None:
            return (await connection.execute(QUERIES[query], params)).mappings().first()

        return await self._run(first)

    async def _all(self, query: str, **params: Any) -> Sequence[RowMapping]:
        async def all_rows(connection: AsyncConnection) -> Sequence[RowMapping]:
            return (await connection.execute(QUERIES[query], params)).mappings().all()

        return await self._run(all_rows)

    async def _execute(self, query: str, **params: Any) -> None:
        async def execute(connection: AsyncConnection) -> None:
            await connection.execute(QUERIES[query], params)

        await self._run(execute)

    # ----- step attempts -----

    async def record_enqueued(
        self, key: str, *, run_id: str, job_name: str, step_key: str, attempt: int
    ) -> bool:
        """Insert the QUEUED row; False when the key was already recorded (nothing changes then).

        RunStopping when Dagster's run is CANCELING or CANCELED (nothing is recorded).
        """
        [row] = await self._all(
            'record_enqueued',
            stopping=list(STOPPING_RUN_STATUSES),
            key=key,
            run_id=run_id,
            job_name=job_name,
            step_key=step_key,
            attempt=attempt,
        )
        if row['run_status'] in STOPPING_RUN_STATUSES:
            raise RunStopping(f'run {run_id} is {row["run_status"]}: {key} not launched')
        return bool(row['recorded'])

    async def reclaim(self, key: str, *, worker_id: str, lease_s: float) -> Claimed | None:
        """Take back, under a new token, a RUNNING attempt that `worker_id` owns but does not run
        (its claim's answer was lost); None when it is not that."""
        row = await self._first('reclaim', key=key, worker_id=worker_id, lease_s=lease_s)
        if row is None:
            return None
        return Claimed(token=row['lease_token'], lease_expires_at=row['lease_expires_at'])

    async def claim(self, key: str, *, worker_id: str, lease_s: float) -> Claimed | Refused:
        """Win the key for `worker_id` if it is QUEUED; else count the delivery and say why not."""
        row = await self._first('claim', key=key, worker_id=worker_id, lease_s=lease_s)
        if row is not None:
            return Claimed(token=row['lease_token'], lease_expires_at=row['lease_expires_at'])
        row = await self._first('refuse', key=key, grace_s=self.abandon_grace_s)
        if row is None:
            return Refused(state=None)
        return Refused(
            state=StepState(row['state']),
            owner=row['owner'],
            token=row['lease_token'],
            lease_expired=bool(row['lease_expired']),
            abandonable=bool(row['abandonable']),
        )

    async def heartbeat(self, key: str, *, token: int, lease_s: float) -> LeaseStatus:
        """Extend the lease of the holder of `token`; CANCELLED or LOST when it may not go on."""
        if await self._first('heartbeat', key=key, token=token, lease_s=lease_s) is not None:
            return LeaseStatus.RENEWED
        row = await self.get_execution(key)
        if row is not None and row['lease_token'] == token and row['state'] == StepState.CANCELLED:
            return LeaseStatus.CANCELLED
        return LeaseStatus.LOST

    async def finish(
        self,
        key: str,
        *,
        token: int,
        outcome: StepState,
        error: str | None = None,
        effects: Sequence[Mapping[str, Any]] = (),
        dagster_event: DagsterEventRow | None = None,
    ) -> bool:
        """Record COMPLETED or FAILED for the holder of `token`; False when the token is stale.

        `effects` (name, payload) and the attempt's terminal `dagster_event` are written by the
        same statement, and only if it wins.
        """
        if outcome not in (StepState.COMPLETED, StepState.FAILED):
            raise ValueError(f'an attempt finishes COMPLETED or FAILED, not {outcome}')
        stored_effects = [{'name': e['name'], 'payload': e['payload']} for e in effects]
        params = {
            'key': key,
            'token': token,
            'outcome': str(outcome),
            'error': storable(error),
            'effects': json.dumps(storable(stored_effects)),
            **_event_params(dagster_event),
        }

        async def fenced_finish(connection: AsyncConnection) -> bool:
            return (await connection.execute(QUERIES['finish'], params)).first() is not None

        return await self._run(fenced_finish, autocommit=True)

    async def record_cancelled_event(
        self, key: str, *, token: int, dagster_event: DagsterEventRow
    ) -> bool:
        """Write the interrupted attempt's terminal failure to Dagster's event log, if the attempt
        is CANCELLED under `token` and the event is not a success; whether it was written."""
        params = {'key': key, 'token': token, **_event_params(dagster_event)}
        return bool(await self._all('cancelled_event', **params))

    async def abandon(self, key: str, *, token: int) -> str | None:
        """Mark ABANDONED a RUNNING attempt whose lease (held with `token`) expired more than the
        abandon grace ago, so its owner has certainly stopped its step.

        Returns the recorded reason (naming the lost worker) when this call did it, else None: the
        lease is live or in its grace, the token is stale, or someone else abandoned it first.
        """
        row = await self._first('abandon', key=key, token=token, grace_s=self.abandon_grace_s)
        return None if row is None else str(row['error'])

    async def reap_expired(self) -> list[str]:
        """Abandon every attempt whose lease expired more than the grace ago; their keys."""
        rows = await self._all('reap_expired', grace_s=self.abandon_grace_s)
        return [row['idempotency_key'] for row in rows]

    async def expire_lease(self, key: str, *, token: int) -> bool:
        """End the lease of the holder of `token` now, so the attempt is abandoned and retried."""
        return await self._first('expire_lease', key=key, token=token) is not None

    async def cancel(
        self, key: str, *, reason: str = 'cancelled', only_queued: bool = False
    ) -> bool:
        """Mark a QUEUED (or RUNNING) attempt CANCELLED; an owner sees it at its next heartbeat."""
        states = ['QUEUED'] if only_queued else ['QUEUED', 'RUNNING']
        params = {'key': key, 'reason': reason, 'states': states}

        async def cancel_and_close(connection: AsyncConnection) -> bool:
            row = (await connection.execute(QUERIES['cancel'], params)).mappings().first()
            if row is not None and row['lease_token'] is not None:
                close = {'key': key, 'token': row['lease_token']}
                await connection.execute(QUERIES['close_cancelled_start'], close)
            return row is not None

        return await self._run(cancel_and_close)

    async def cancel_run(self, run_id: str, *, reason: str) -> int:
        """Cancel every QUEUED or RUNNING attempt of a run; how many were."""

        async def cancel_and_close(connection: AsyncConnection) -> int:
            params = {'run_id': run_id, 'reason': reason}
            cancelled = (await connection.execute(QUERIES['cancel_run'], params)).all()
            await connection.execute(QUERIES['close_cancelled_starts_of_run'], {'run_id': run_id})
            return len(cancelled)

        return await self._run(cancel_and_close)

    async def get_execution(self, key: str) -> RowMapping | None:
        """The attempt's row, with computed `lease_expired`, `abandonable` and `age_s`; None for an
        unknown key."""
        return (await self.get_executions([key])).get(key)

    async def get_executions(self, keys: Sequence[str]) -> dict[str, RowMapping]:
        """The rows of those of `keys` the store knows, by key, as `get_execution` gives one."""
        rows = await self._all('get_executions', keys=list(keys), grace_s=self.abandon_grace_s)
        return {row['idempotency_key']: row for row in rows}

    async def list_executions(self, run_id: str) -> Sequence[RowMapping]:
        return await self._all('list_executions', run_id=run_id)

    async def list_effects(self, run_id: str) -> Sequence[RowMapping]:
        return await self._all('list_effects', run_id=run_id)

    async def list_log(self, run_id: str) -> Sequence[RowMapping]:
        """`execution_log` rows of a run: one per start of an attempt, duplicates included."""
        return await self._all('list_log', run_id=run_id)

    # ----- workers and scaling -----

    async def worker_seen(self, worker_id: str, *, concurrency: int, running: int) -> None:
        """Register or refresh a live worker (it calls this every heartbeat interval)."""
        await self._execute(
            'worker_seen', worker_id=worker_id, concurrency=concurrency, running=running
        )

    async def worker_stopped(self, worker_id: str) -> None:
        await self._execute('worker_stopped', worker_id=worker_id)

    async def live_workers(self, within_s: float) -> RowMapping:
        """Workers seen within `within_s`: their count, slots and running steps."""
        row = await self._first('live_workers', within_s=within_s)
        assert row is not None  # an aggregate always returns a row
        return row

    async def record_scaling_event(self, **event: object) -> None:
        """One auto-scaler decision: cluster, service, the inputs, the desired count and why."""
        await self._execute('record_scaling_event', **event)

    async def list_scaling_events(self, service: str) -> Sequence[RowMapping]:
        return await self._all('list_scaling_events', service=service)
