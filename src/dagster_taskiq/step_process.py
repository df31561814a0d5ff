"""What runs inside a step's own process, forked from the worker's warm forkserver.

The child executes exactly one step attempt through Dagster's own execute-step machinery (the body
of `dagster api execute_step`) against the shared Dagster instance, then sends a `StepOutcome` to
the worker over a pipe. Every event but the attempt's terminal one (success, failure or retry) goes
to Dagster's event log as usual; that one travels in the outcome, and the worker writes it with the
attempt's fenced finish, so Dagster records it only if the store does. SIGTERM reaches Dagster's
interrupt handling. Ops may record side effects with `record_effect`; the worker writes them with
the finish too (the transactional outbox).
"""

import contextlib
import gc
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import sqlalchemy.event
import sqlalchemy.exc
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    Definitions,
    EventLogEntry,
    RunsFilter,
)
from dagster._cli.api import _execute_step_command_body
from dagster._core.events import DagsterEventBatchMetadata
from dagster._core.execution import compute_logs
from dagster._grpc.types import ExecuteStepArgs
from dagster._record import copy
from dagster._serdes import deserialize_value, serialize_value
from dagster._utils.hosted_user_process import recon_job_from_origin
from dagster._utils.interrupts import capture_interrupts
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from dagster_taskiq.logs import get_logger
from dagster_taskiq.message import step_identity
from dagster_taskiq.store import DagsterEventRow

log = get_logger(__name__)

MAX_ERROR_CHARS = 8000
NO_RUN_ID = '00000000-0000-0000-0000-000000000000'  # warms the queries when no run is known
TAIL_POLL_S = 0.1  # how often the compute-log mirror looks for new output (`tail -F`: 1 s)
MIRROR_DRAIN_S = 5.0  # longest wait, after a step, for the mirror to copy the rest of its output
EXTRA_STORAGE_CONNECTIONS = 4  # beyond the one kept per storage, for threads that write at once
STEP_PING_IDLE_S = 1.0  # a step process pings a kept connection idle this long before using it
TERMINAL_EVENTS = {  # an attempt ends in Dagster's event log with exactly one of these
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}
_effects: list[dict[str, Any]] = []
_kept_pools: 'weakref.WeakSet[Pool]' = weakref.WeakSet()  # the pools keep_storage_connections made
# Built once in the forkserver by `warm_up`, inherited by every step process forked from it
_warm_instance: DagsterInstance | None = None


@dataclass
class StepOutcome:
    succeeded: bool = False
    error: str | None = None
    effects: list[dict[str, Any]] = field(default_factory=list)
    # the attempt's terminal event, withheld from Dagster's event log for the worker's finish
    dagster_event: DagsterEventRow | None = None


def record_effect(name: str, payload: dict[str, Any]) -> None:
    """Record a side effect of the running step, written only if the attempt completes.

    Call it from an op's body; outside a taskiq step process the effect is kept in memory only.
    """
    _effects.append({'name': name, 'payload': json.loads(json.dumps(payload))})


def keep_storage_connections(instance: DagsterInstance, ping_idle_s: float = 0.0) -> None:
    """Keep one open connection per storage for this process, instead of one per call.

    dagster-postgres connects anew for every call (NullPool): ~5 ms of PostgreSQL's CPU each. The
    run worker polls the event log every `sleep_seconds` and a step process writes ~12 events, so
    on a 2-core machine those connections cost more than the steps. The engines that replace
    Dagster's are the ones its webserver uses (no statement timeout here). A kept connection must
    survive a database restart or a reset connection, or the run worker dies with the run
    unfinished: a connection idle for `ping_idle_s` or longer is pinged as it is checked out, and
    a dead one is replaced (see `_ping_idle_connections`).
    Done once per instance: again, it would replace the engines and their open connections.
    """
    if _storage_engines_kept(instance):
        return
    instance.optimize_for_webserver(
        statement_timeout=0, pool_recycle=-1, max_overflow=EXTRA_STORAGE_CONNECTIONS
    )
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        engine = getattr(storage, '_engine', None)
        if engine is not None:
            _ping_idle_connections(engine.pool, ping_idle_s)


def _ping_idle_connections(pool: Pool, idle_s: float) -> None:
    """SQLAlchemy's pre-ping (a `SELECT 1` at checkout; a dead connection is replaced), for a
    connection that has been idle for `idle_s` or longer only (dagster-postgres has no option
    for either: the pool gets the listeners here). A step process writes its ~12 events a few ms
    apart: a ping before each was ~5 ms of a chain step. The reset of a connection idle for less
    than `idle_s` is then met by the statement itself, as a reset in the middle of one would be."""
    _kept_pools.add(pool)

    def checkin(_: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        record.info['checked_in_at'] = time.monotonic()

    def checkout(connection: DBAPIConnection, record: ConnectionPoolEntry, _: object) -> None:
        checked_in_at = record.info.get('checked_in_at')
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_s:
            return  # new, or used just now
        try:
            cursor = connection.cursor()
            cursor.execute('SELECT 1')
            cursor.close()
        except Exception as error:  # any failure: the pool replaces the connection
            raise sqlalchemy.exc.DisconnectionError(f'ping failed: {error!r}') from error

    sqlalchemy.event.listen(pool, 'checkin', checkin)
    sqlalchemy.event.listen(pool, 'checkout', checkout)


def _storage_engines_kept(instance: DagsterInstance) -> bool:
    engine = getattr(instance.event_log_storage, '_engine', None)
    return engine is not None and engine.pool in _kept_pools


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def tail_in_thread(path: str, stream: Any) -> Iterator[tuple[None, None]]:
    """Mirror what is appended to `path` onto `stream`, from a thread, until the block ends.

    What Dagster's compute-log capture does with a `tail -F` process and a Python process that
    watches it for each of stdout and stderr: four processes a step (~50 ms of the two cores, and
    ~35 ms waiting for them to stop after the step). The capture itself (the step's output into
    the compute-log file) is Dagster's, unchanged; the copy to the worker's own output is made
    from a duplicate of the stream's descriptor taken before Dagster redirects it to the file,
    and ends after a last read of everything the step wrote.
    """
    try:
        mirror_fd = os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file: nothing to mirror onto
        yield (None, None)
        return
    ended = threading.Event()

    def copy() -> None:
        with contextlib.suppress(OSError), open(path, 'rb') as source:
            while True:
                chunk = source.read(65536)
                if chunk:
                    _write_all(mirror_fd, chunk)
                elif ended.is_set():
                    return
                else:
                    ended.wait(TAIL_POLL_S)

    copier = threading.Thread(target=copy, name='compute-log-mirror', daemon=True)
    copier.start()
    try:
        yield (None, None)
    finally:
        ended.set()
        # a worker output nobody reads (a full pipe) must not hold the step: the copy is a
        # courtesy, the compute-log file has it all
        copier.join(MIRROR_DRAIN_S)
        if not copier.is_alive():
            os.close(mirror_fd)


def find_run(instance: DagsterInstance, run_id: str) -> DagsterRun | None:
    """The run, in one query (get_run_by_id reflects the runs table's columns on every call)."""
    runs = instance.get_runs(RunsFilter(run_ids=[run_id]), limit=1)
    return runs[0] if runs else None


def warm_up() -> None:
    """Do in the forkserver, once, what every step process forked from it would otherwise redo.

    The code location's `Definitions` build their repository (~25 ms a step otherwise), and the
    Dagster instance of DAGSTER_HOME is built: its storages import their drivers and check their
    tables here, not per step (~250 ms), and given the pooled engines of
    `keep_storage_connections` (~8 ms a step). A fork inherits no open connection: the checks'
    connections are closed (NullPool), and the pooled engines have not connected yet.
    """
    global _warm_instance
    try:
        for module in list(sys.modules.values()):
            for value in list(vars(module).values()):
                if isinstance(value, Definitions):
                    value.get_repository_def()
        if os.environ.get('DAGSTER_HOME'):
            _warm_instance = DagsterInstance.get()
            _warm_instance.compute_log_manager  # noqa: B018 - built lazily: build it now
            # pooled engines with no connection yet: each step process opens its own
            keep_storage_connections(_warm_instance, STEP_PING_IDLE_S)
    except Exception as error:  # noqa: BLE001 - the steps then do it themselves
        log.warning('step_warm_up_failed', error=repr(error))
    # Out of the garbage collector's sight from here on: a collection in a step process would
    # otherwise write to every object it inherited (copying the forkserver's pages, ~MBs a step)
    gc.freeze()


@contextlib.contextmanager
def _instance() -> Iterator[DagsterInstance]:
    """The worker's own Dagster instance (DAGSTER_HOME), never one a message names: the worker
    has checked that the message's run reports to this instance's storage."""
    if _warm_instance is not None:
        yield _warm_instance  # the process ends with the step: nothing to dispose
        return
    with DagsterInstance.get() as instance:
        yield instance


def _withhold_terminal_event(
    instance: DagsterInstance, step_key: str, outcome: StepOutcome
) -> None:
    """Keep the attempt's terminal event out of Dagster's event log: it goes in `outcome`.

    Were it written here, a step that finished while its worker was frozen or cut off would have
    a STEP_SUCCESS in Dagster after its lease expired and its attempt was abandoned and retried.
    """
    store_event = instance.handle_new_event

    def handle_new_event(
        event: EventLogEntry, *, batch_metadata: DagsterEventBatchMetadata | None = None
    ) -> None:
        dagster_event = event.dagster_event
        if (
            dagster_event is not None
            and dagster_event.step_key == step_key
            and dagster_event.event_type in TERMINAL_EVENTS
        ):
            outcome.dagster_event = DagsterEventRow(
                event=serialize_value(event),
                event_type=dagster_event.event_type_value,
                timestamp=event.timestamp,
            )
            return
        store_event(event, batch_metadata=batch_metadata)

    instance.handle_new_event = handle_new_event  # type: ignore[method-assign]


def _execute(args: ExecuteStepArgs, outcome: StepOutcome) -> None:
    step_key, _, _ = step_identity(args)
    args = copy(args, should_verify_step=True)  # whatever the message says: one start per attempt
    with _instance() as instance:
        keep_storage_connections(instance, STEP_PING_IDLE_S)
        run = find_run(instance, args.run_id)
        if run is None:
            outcome.error = f'run {args.run_id} not found in the Dagster instance'
            return
        _withhold_terminal_event(instance, step_key, outcome)
        for event in _execute_step_command_body(args, instance, run):
            if event.event_type in TERMINAL_EVENTS:
                outcome.succeeded = event.event_type is DagsterEventType.STEP_SUCCESS
                if not outcome.succeeded:
                    error = getattr(event.event_specific_data, 'error', None)
                    outcome.error = error.to_string() if error else event.message
        if outcome.dagster_event is None and outcome.error is None:
            run = find_run(instance, args.run_id) or run
            outcome.error = (
                f'Dagster did not execute the step (run {run.status.value}: the attempt had '
                'already started, or the run is ending)'
            )


def _guard(lifeline: Connection) -> None:
    """Kill this step's process group when the worker is gone or stops extending its deadline.

    The worker sends, every time it renews the attempt's lease, how many seconds this process may
    live without another renewal; it ends before the lease can expire. The step process is a child
    of the forkserver, not of the worker, so nothing else would stop it when the worker is killed
    (its end of `lifeline` closes), frozen (SIGSTOP, a VM pause) or cut off from the store: a step
    that outlived its lease could run beside the next attempt and report to Dagster after its
    attempt was abandoned. Processes that user code started are in the group and die with it.
    """
    deadline_s: float | None = None
    with contextlib.suppress(EOFError, OSError):
        while deadline_s is None or lifeline.poll(max(0.0, deadline_s - time.monotonic())):
            deadline_s = time.monotonic() + float(lifeline.recv())
    os.killpg(os.getpgid(0), signal.SIGKILL)


def report_failed_imports(modules: Sequence[str], result: Connection) -> None:
    """Send which of `modules` this process could not import, and why (the forkserver's preload
    skips a module that fails to import without a word)."""
    failed = []
    for name in modules:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - reported to the worker, which stops
                failed.append(f'{name}: {error!r}')
    result.send(failed)
    result.close()


def _connect_ahead(run_id: str | None) -> None:
    """Open this process's storage connections before its step is known (see `run_step`), with
    the queries its step makes first (the run's record, its events), so PostgreSQL has the
    connections' caches warm too. Whatever fails here, the step does again, and reports."""
    if _warm_instance is None:
        return
    try:  # the pooled engines are the forkserver's (warm_up): this opens their connections
        run = find_run(_warm_instance, run_id or NO_RUN_ID)
        _warm_instance.get_records_for_run(run_id or NO_RUN_ID, limit=1)
        if run is not None and run.job_code_origin is not None and not run.has_repository_load_data:
            # the job definition and its run config schema, as the step will get them: Dagster
            # caches both (per job, per process), so the step finds them built (~7 ms a step)
            recon_job = recon_job_from_origin(run.job_code_origin).get_subset(
                op_selection=run.resolved_op_selection,
                asset_selection=run.asset_selection,
                asset_check_selection=run.asset_check_selection,
            )
            recon_job.get_definition().run_config_schema  # noqa: B018 - built lazily: build it now
    except Exception as error:  # noqa: BLE001 - the step's own calls meet it again, and say so
        log.debug('step_connect_ahead_failed', error=repr(error))


def run_step(
    step_args: Connection, result: Connection, lifeline: Connection, run_id: str | None
) -> None:
    """Entry point of the step process: get ready, then execute the step the worker sends on
    `step_args` and send it the outcome.

    The worker starts the process ahead of its step (a spare, ready when the next attempt is
    claimed): forked and connected to the storages (with the queries of a step of `run_id`, the
    run its last step belonged to, warm) before the attempt's lease starts. A spare the worker
    retires, or whose worker is gone (`step_args` closed), exits without a word. The guard starts
    with the step: a spare runs no user code, and started earlier, the guard of a spare that had
    waited longer than the deadline the worker then sent killed the step at once (seen in tests
    with a 3 s lease, the cause not found).
    """
    os.setpgid(0, 0)  # a group of its own, which the worker and the guard kill as one
    compute_logs.tail_to_stream = tail_in_thread  # in this process only: see tail_in_thread
    _connect_ahead(run_id)
    try:
        execute_step_args: str = step_args.recv()
    except (EOFError, OSError):
        return  # retired, or the worker is gone, before it had a step
    threading.Thread(target=_guard, args=(lifeline,), daemon=True).start()
    outcome = StepOutcome()
    try:
        with capture_interrupts():
            _execute(deserialize_value(execute_step_args, ExecuteStepArgs), outcome)
    except BaseException:  # noqa: BLE001 - the worker must hear of any ending, interrupts too
        outcome.error = traceback.format_exc()[-MAX_ERROR_CHARS:]
    outcome.effects = list(_effects) if outcome.succeeded else []
    if outcome.error:
        outcome.error = outcome.error[-MAX_ERROR_CHARS:]
    result.send(outcome)
    result.close()
