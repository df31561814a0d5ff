"""The worker's logic in-process: a real moto queue and real PostgreSQL, steps the test drives.

The step runner here runs a coroutine the test gives it instead of forking a step process, so a
test can hold a step until it says so, or end it as a dead process would. The e2e suite runs the
same worker with real step processes.
"""

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dagster import DagsterEvent, DagsterEventType, EventLogEntry
from dagster._core.events import StepSuccessData
from dagster._serdes import deserialize_value, serialize_value
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from dagster_taskiq import journal, message
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import SqsQueue, bootstrap_queues, open_queue
from dagster_taskiq.step_process import StepOutcome
from dagster_taskiq.store import Claimed, DagsterEventRow, StepState, Store
from dagster_taskiq.worker import Worker, WorkerOptions
from dagster_taskiq_demo.faultproxy import FaultProxy, Mode
from tests.one_op import step_args
from tests.waiting import eventually

LEASE_S = 1.5  # heartbeats every 0.5 s
DIED = StepOutcome(error='step process exited with code 3')

StepBody = Callable[[message.OpExecutionTask], Awaitable[StepOutcome]]


@dataclass
class CallableStepRun:
    """A step that is a coroutine: `interrupt` and `kill` cancel it, as signals end a process."""

    task: message.OpExecutionTask
    running: asyncio.Task[StepOutcome]
    stopped_by: str | None = None
    stopped_at: float | None = None  # time.time(): PostgreSQL runs on this host, on this clock
    pid: int | None = None
    extensions: list[float] = field(default_factory=list)  # what the self-guard was granted

    async def outcome(self) -> StepOutcome:
        try:
            return await self.running
        except asyncio.CancelledError:
            return StepOutcome(error=f'step process ended by {self.stopped_by}')

    def extend(self, seconds: float) -> None:
        self.extensions.append(seconds)

    def interrupt(self) -> None:
        self._stop('SIGTERM')

    def kill(self) -> None:
        self._stop('SIGKILL')

    def _stop(self, how: str) -> None:
        if not self.running.done():
            self.stopped_by = self.stopped_by or how
            self.stopped_at = self.stopped_at or time.time()
            self.running.cancel()


@dataclass
class CallableStepRunner:
    body: StepBody
    runs: list[CallableStepRun] = field(default_factory=list)
    ready_delays_s: list[float] = field(default_factory=list)  # of the first readies, in turn

    async def start(self) -> None:
        pass

    async def ready(self) -> None:
        if self.ready_delays_s:
            await asyncio.sleep(self.ready_delays_s.pop(0))  # as a forkserver restarting

    async def run(self, task: message.OpExecutionTask) -> CallableStepRun:
        started = CallableStepRun(task, asyncio.create_task(self.body(task)))
        self.runs.append(started)
        return started

    def close(self) -> None:
        pass


def step_success(task: message.OpExecutionTask) -> DagsterEventRow:
    """The STEP_SUCCESS entry a step process would withhold for the worker's finish."""
    entry = EventLogEntry(
        user_message='',
        level=logging.DEBUG,
        job_name=task.job_name,
        run_id=task.run_id,
        error_info=None,
        timestamp=time.time(),
        step_key=task.step_key,
        dagster_event=DagsterEvent(
            event_type_value=DagsterEventType.STEP_SUCCESS.value,
            job_name=task.job_name,
            step_key=task.step_key,
            event_specific_data=StepSuccessData(duration_ms=1.0),
        ),
    )
    return DagsterEventRow(
        event=serialize_value(entry), event_type='STEP_SUCCESS', timestamp=entry.timestamp
    )


async def succeeds(task: message.OpExecutionTask) -> StepOutcome:
    return StepOutcome(
        succeeded=True,
        effects=[{'name': 'row', 'payload': {}}],
        dagster_event=step_success(task),
    )


class Gate:
    """A step body that waits until the test opens the gate, then succeeds."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self, task: message.OpExecutionTask) -> StepOutcome:
        self.entered.set()
        await self.opened.wait()
        return await succeeds(task)


@dataclass
class Harness:
    db: Store
    queue: SqsQueue
    settings: Settings
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    async def enqueue(self, step_key: str = 'noop', attempt: int = 0) -> message.OpExecutionTask:
        """Record a QUEUED attempt and send its message, as the executor's launch_step does."""
        args = step_args(self.run_id, attempt, step_key)
        task = message.build_task(args, job_name='one_op_job', enqueued_at=0.0)
        await self.db.record_enqueued(
            task.idempotency_key,
            run_id=task.run_id,
            job_name=task.job_name,
            step_key=step_key,
            attempt=attempt,
        )
        await self.queue.send(message.encode(task, None), {})
        return task

    async def state(self, task: message.OpExecutionTask) -> str | None:
        row = await self.db.get_execution(task.idempotency_key)
        return None if row is None else str(row['state'])

    async def reaches(self, task: message.OpExecutionTask, state: StepState) -> None:
        async def reached() -> bool:
            return await self.state(task) == state

        await eventually(reached, what=f'{task.idempotency_key} {state}')

    async def dagster_events(self, run_id: str) -> list[EventLogEntry]:
        """The run's entries in Dagster's event log table, oldest first."""
        async with self.db.engine.connect() as connection:
            rows = await connection.exec_driver_sql(
                'SELECT event FROM event_logs WHERE run_id = %(run_id)s ORDER BY id',
                {'run_id': run_id},
            )
            return [deserialize_value(row.event, EventLogEntry) for row in rows]

    async def queue_empty(self) -> bool:
        depth = await self.queue.depth()
        return depth.visible + depth.in_flight == 0


@pytest.fixture
async def harness(settings: Settings, db: Store) -> AsyncIterator[Harness]:
    settings = settings.model_copy(update={'lease_s': LEASE_S, 'visibility_timeout_s': 5})
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        yield Harness(db, queue, settings)


@dataclass
class Running:
    worker: Worker
    runner: CallableStepRunner
    serving: asyncio.Task[None]

    async def stop(self) -> None:
        self.worker.request_stop('test')
        await asyncio.wait_for(self.serving, timeout=30)


@pytest.fixture
async def start_worker(
    harness: Harness, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Running] = []

    async def start(
        body: StepBody = succeeds,
        drain_timeout_s: float = 30.0,
        store: Store | None = None,
        queue: SqsQueue | None = None,
        ready_delays_s: list[float] | None = None,
    ) -> Running:
        runner = CallableStepRunner(body, ready_delays_s=ready_delays_s or [])
        options = WorkerOptions(
            concurrency=2,
            poll_wait_s=1,
            drain_timeout_s=drain_timeout_s,
            worker_id=f'w-{len(started)}',
            journal_dir=tmp_path / 'journal',
        )
        worker = Worker(
            queue or harness.queue, store or harness.db, runner, harness.settings, options
        )
        running = Running(worker, runner, asyncio.create_task(worker.run()))
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.serving.done():
            await running.stop()


async def test_a_message_is_claimed_run_and_finished_with_its_effects(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    task = await harness.enqueue()
    running = await start_worker()
    await harness.reaches(task, StepState.COMPLETED)
    await eventually(harness.queue_empty, what='the message deleted')
    effects = await harness.db.list_effects(task.run_id)
    assert [(e['step_key'], e['name']) for e in effects] == [('noop', 'row')]
    log = await harness.db.list_log(task.run_id)
    assert [(r['worker_id'], r['outcome']) for r in log] == [('w-0', 'COMPLETED')]
    assert [run.task.idempotency_key for run in running.runner.runs] == [task.idempotency_key]
    [event] = await harness.dagster_events(task.run_id)
    assert (event.step_key, event.dagster_event_type) == ('noop', DagsterEventType.STEP_SUCCESS)


async def test_a_claim_whose_answer_was_lost_is_taken_back_by_its_worker(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """The claim committed but its answer never came back (a connection cut at COMMIT): the
    attempt is RUNNING under this worker's id with nothing running it. When the message comes
    back, the worker takes it back under a new token and runs it, instead of dropping it until
    the lease expires and a retry is spent."""
    task = await harness.enqueue()
    lost = await harness.db.claim(task.idempotency_key, worker_id='w-0', lease_s=60)
    assert isinstance(lost, Claimed)
    running = await start_worker()  # w-0, as the first worker the fixture starts
    await harness.reaches(task, StepState.COMPLETED)
    assert len(running.runner.runs) == 1
    [start] = await harness.db.list_log(task.run_id)  # the lost claim's start, moved, closed
    assert (start['outcome'], start['lease_token'] > lost.token) == ('COMPLETED', True)


async def test_two_copies_in_hand_at_once_run_the_attempt_once(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """Both copies of a message reach one worker in one receive; the copy that came first is
    slower to claim, so it finds the attempt RUNNING under its own worker's id: that is the
    other copy's claim, not a claim whose answer was lost, and must not be taken back."""
    task = await harness.enqueue()
    await harness.queue.send(message.encode(task, None), {})

    async def outlasts_the_slow_claim(task: message.OpExecutionTask) -> StepOutcome:
        await asyncio.sleep(1.0)
        return await succeeds(task)

    running = await start_worker(outlasts_the_slow_claim, ready_delays_s=[0.3, 0.0])
    await harness.reaches(task, StepState.COMPLETED)
    await eventually(harness.queue_empty, what='both messages deleted')
    assert len(running.runner.runs) == 1
    assert [r['outcome'] for r in await harness.db.list_log(task.run_id)] == ['COMPLETED']


async def test_a_duplicate_delivery_is_refused_and_deleted(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    task = await harness.enqueue()
    await harness.queue.send(message.encode(task, None), {})  # delivered twice
    running = await start_worker()
    await harness.reaches(task, StepState.COMPLETED)
    await eventually(harness.queue_empty, what='both messages deleted')
    row = await harness.db.get_execution(task.idempotency_key)
    assert row is not None and (row['delivery_count'], row['refused_count']) == (2, 1)
    assert len(running.runner.runs) == 1
    assert len(await harness.db.list_log(task.run_id)) == 1


async def test_a_step_that_dies_is_recorded_failed(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    async def dies(_: message.OpExecutionTask) -> StepOutcome:
        return DIED

    task = await harness.enqueue()
    await start_worker(dies)
    await harness.reaches(task, StepState.FAILED)
    row = await harness.db.get_execution(task.idempotency_key)
    assert row is not None and row['error'] == DIED.error
    assert await harness.db.list_effects(task.run_id) == []


async def test_a_lost_lease_kills_the_step_and_records_nothing(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    gate = Gate()
    task = await harness.enqueue()
    running = await start_worker(gate)
    await asyncio.wait_for(gate.entered.wait(), timeout=10)
    row = await harness.db.get_execution(task.idempotency_key)
    assert row is not None
    # What the executor's health check does once the lease has expired: abandon, fenced.
    assert await harness.db.expire_lease(task.idempotency_key, token=row['lease_token'])
    assert await harness.db.abandon(task.idempotency_key, token=row['lease_token'])

    async def killed() -> bool:
        return running.runner.runs[0].stopped_by == 'SIGKILL'

    await eventually(killed, what='the step killed at the next heartbeat')
    await eventually(harness.queue_empty, what='the message deleted')
    assert await harness.state(task) == StepState.ABANDONED
    assert await harness.db.list_effects(task.run_id) == []


async def test_a_cancel_interrupts_the_step(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    gate = Gate()
    task = await harness.enqueue()
    running = await start_worker(gate)
    await asyncio.wait_for(gate.entered.wait(), timeout=10)
    assert await harness.db.cancel(task.idempotency_key, reason='run terminated')

    async def interrupted() -> bool:
        return running.runner.runs[0].stopped_by == 'SIGTERM'

    await eventually(interrupted, what='the step interrupted at the next heartbeat')
    await eventually(harness.queue_empty, what='the message deleted')
    assert await harness.state(task) == StepState.CANCELLED


async def test_a_stop_lets_a_running_step_finish_within_the_drain(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    gate = Gate()
    task = await harness.enqueue()
    running = await start_worker(gate)
    await asyncio.wait_for(gate.entered.wait(), timeout=10)
    running.worker.request_stop('test')
    gate.opened.set()  # after the stop: the drain waits for the step (30 s drain timeout)
    await asyncio.wait_for(running.serving, timeout=30)
    assert await harness.state(task) == StepState.COMPLETED
    assert running.runner.runs[0].stopped_by is None
    assert await harness.queue_empty()


async def test_past_the_drain_a_step_is_released_for_another_worker(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    gate = Gate()
    task = await harness.enqueue()
    running = await start_worker(gate, drain_timeout_s=0.1)
    await asyncio.wait_for(gate.entered.wait(), timeout=10)
    await running.stop()
    assert running.runner.runs[0].stopped_by == 'SIGKILL'
    row = await harness.db.get_execution(task.idempotency_key)
    assert row is not None and row['state'] == 'RUNNING' and row['lease_expired']
    [again] = await harness.queue.receive(1, wait_s=1)  # visible again at once
    assert message.parse(again.body, None) == task


async def test_a_step_that_ends_as_it_is_released_still_has_its_outcome_written(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """The drain's release reaches a step whose process has just written its outcome and exited,
    before the worker has read it: the outcome is written (fenced), not dropped for a retry."""
    gate = Gate()
    task = await harness.enqueue()
    running = await start_worker(gate)
    await asyncio.wait_for(gate.entered.wait(), timeout=10)
    step = running.worker.attempts.running[task.idempotency_key]
    releasing: list[asyncio.Future[None]] = []
    # runs as the step's body ends, before the worker's supervisor sees it end
    running.runner.runs[0].running.add_done_callback(
        lambda _: releasing.append(asyncio.ensure_future(running.worker.attempts.release(step)))
    )
    gate.opened.set()
    await harness.reaches(task, StepState.COMPLETED)
    await asyncio.gather(*releasing)
    assert step.released
    assert len(running.runner.runs) == 1  # not run again
    log = await harness.db.list_log(task.run_id)
    assert [(r['lease_token'], r['outcome']) for r in log] == [(step.token, 'COMPLETED')]
    assert [e['name'] for e in await harness.db.list_effects(task.run_id)] == ['row']
    [event] = await harness.dagster_events(task.run_id)
    assert event.dagster_event_type == DagsterEventType.STEP_SUCCESS


async def test_outcomes_still_journaled_at_a_stop_are_written_by_it(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """An outcome the database could not take waits in the journal; a worker that stops writes
    it (fenced) on its way out instead of leaving it for the next worker on the folder."""
    key = f'{harness.run_id}:noop:0'
    await harness.db.record_enqueued(
        key, run_id=harness.run_id, job_name='one_op_job', step_key='noop', attempt=0
    )
    claim = await harness.db.claim(key, worker_id='w-0', lease_s=60)
    assert isinstance(claim, Claimed)
    running = await start_worker()
    lock = running.worker.options.journal_dir / 'journal-w-0.lock'

    async def journal_open() -> bool:
        return lock.exists()

    await eventually(journal_open, what='the journal open')
    entry = journal.Entry(
        key, claim.token, StepState.COMPLETED, effects=[{'name': 'row', 'payload': {}}]
    )
    running.worker.journal.append(entry)
    await running.stop()
    row = await harness.db.get_execution(key)
    assert row is not None and row['state'] == StepState.COMPLETED
    assert [e['name'] for e in await harness.db.list_effects(harness.run_id)] == ['row']
    assert not list((running.worker.options.journal_dir).glob('*.jsonl'))


async def test_a_crashed_side_task_stops_the_worker(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    running = await start_worker()
    journal_dir = tmp_path / 'journal'

    async def journal_open() -> bool:
        return journal_dir.is_dir()

    await eventually(journal_open, what='the journal open')
    shutil.rmtree(journal_dir)
    journal_dir.write_text('the disk under the journal is gone')  # the reconciler fails
    await asyncio.wait_for(running.serving, timeout=30)
    assert running.worker.crash is not None
    assert running.worker.crash.startswith('side task journal crashed: NotADirectoryError')


async def test_a_queue_deleted_under_the_worker_is_said_plainly_and_backed_off(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    with capture_logs() as logs:
        running = await start_worker()
        await harness.queue.client.delete_queue(QueueUrl=harness.queue.urls.queue_url)

        async def missed_thrice() -> bool:
            return len([e for e in logs if e['event'] == 'queue_missing']) >= 3

        await eventually(missed_thrice, what='three failed receives')
        await running.stop()
    waits = [e['retry_in_s'] for e in logs if e['event'] == 'queue_missing']
    base_s, max_s = harness.settings.retry_base_s, harness.settings.retry_max_s
    assert waits[:3] == [min(max_s, base_s * 2**n) for n in range(3)]  # backs off, no tight loop
    assert 'does not exist' in next(e['error'] for e in logs if e['event'] == 'queue_missing')


@pytest.fixture
async def store_through_proxy(harness: Harness, database_url: str) -> AsyncIterator[FaultProxy]:
    """A proxy between the worker and PostgreSQL (the test's own store connects directly)."""
    url = make_url(database_url)
    with FaultProxy('127.0.0.1', url.port or 5432) as proxy:
        yield proxy
        proxy.set_mode(Mode.RESET)  # end the worker's hung calls at once


def proxied_store(proxy: FaultProxy, database_url: str) -> Store:
    url = make_url(database_url).set(host='127.0.0.1', port=proxy.port)
    return Store.connect(url.render_as_string(False), abandon_grace_s=0.0)


@pytest.mark.slow
async def test_a_worker_cut_off_from_the_store_kills_its_step_before_the_lease_expires(
    harness: Harness,
    start_worker: Callable[..., Awaitable[Running]],
    store_through_proxy: FaultProxy,
    database_url: str,
) -> None:
    """Packets to PostgreSQL dropped, connections left open: nothing fails, nothing answers."""
    gate = Gate()
    task = await harness.enqueue()
    cut_off = proxied_store(store_through_proxy, database_url)
    try:
        running = await start_worker(gate, store=cut_off)
        await asyncio.wait_for(gate.entered.wait(), timeout=10)
        store_through_proxy.set_mode(Mode.DROP)

        async def killed() -> bool:
            return running.runner.runs[0].stopped_by == 'SIGKILL'

        await eventually(killed, what='the step killed (self-fenced)')
        row = await harness.db.get_execution(task.idempotency_key)  # straight to PostgreSQL
        assert row is not None and row['state'] == 'RUNNING'  # nothing renewed it since the cut
        killed_at = running.runner.runs[0].stopped_at
        assert killed_at is not None and killed_at < row['lease_expires_at'].timestamp()
        assert running.runner.runs[0].extensions  # the step's own guard was armed too
        await running.stop()
    finally:
        await cut_off.close()


@pytest.mark.slow
async def test_a_worker_cut_off_from_sqs_keeps_its_lease_and_finishes(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """SQS dropping packets must not hold up the lease renewals: the step runs to its end."""
    gate = Gate()
    task = await harness.enqueue()
    sqs_port = urlsplit(str(harness.settings.aws_endpoint_url)).port or 80
    with FaultProxy('127.0.0.1', sqs_port) as proxy:
        settings = harness.settings.model_copy(
            update={'aws_endpoint_url': f'http://127.0.0.1:{proxy.port}'}
        )
        async with open_queue(settings) as cut_off:
            running = await start_worker(gate, queue=cut_off)
            await asyncio.wait_for(gate.entered.wait(), timeout=10)
            proxy.set_mode(Mode.DROP)
            before = await harness.db.get_execution(task.idempotency_key)
            assert before is not None

            async def renewed_twice_more() -> bool:
                row = await harness.db.get_execution(task.idempotency_key)
                renewals = timedelta(seconds=2 * LEASE_S / 3)
                return (
                    row is not None
                    and row['lease_expires_at'] > before['lease_expires_at'] + renewals
                )

            await eventually(renewed_twice_more, what='the lease renewed while SQS is cut off')
            proxy.set_mode(Mode.RESET)  # the partition ends: hung requests fail and are retried
            proxy.set_mode(Mode.PASS)
            gate.opened.set()
            await harness.reaches(task, StepState.COMPLETED)
            assert running.runner.runs[0].stopped_by is None
            await running.stop()


async def test_a_worker_reaps_leases_left_to_expire_by_anyone(
    harness: Harness, start_worker: Callable[..., Awaitable[Running]]
) -> None:
    """An attempt whose worker and run worker are both gone would stay RUNNING forever."""
    task = await harness.enqueue()
    await harness.queue.receive(1, wait_s=1)  # its message is someone else's, in flight
    ghost = await harness.db.claim(task.idempotency_key, worker_id='ghost', lease_s=0.1)
    assert isinstance(ghost, Claimed)
    await start_worker()
    await harness.reaches(task, StepState.ABANDONED)
    row = await harness.db.get_execution(task.idempotency_key)
    assert row is not None and 'ghost' in row['error'] and 'reaped' in row['error']
    [logged] = await harness.db.list_log(task.run_id)
    assert logged['outcome'] == 'ABANDONED'
