"""The worker: long-polls SQS, claims each step attempt in the store, runs it in its own process.

Shape: `run()` starts named side tasks (the worker registry heartbeat, the journal reconciler, the
health/metrics server), then a receive loop that takes at most as many messages as it has free
slots and starts one task per message. Signals only set the stop event; `shutdown()` drains.
Each step runs in a process forked from a warm forkserver (dagster already imported), so the event
loop keeps heartbeating while user code computes, a crash kills only that process, and a cancel
is a signal to it.
"""

import asyncio
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from dagster_taskiq import journal, message, store
from dagster_taskiq.errors import CircuitOpen, InvalidMessage, StoreUnavailable, TransportError
from dagster_taskiq.logs import get_logger
from dagster_taskiq.metrics import WorkerMetrics, serve_health_and_metrics
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import CircuitBreaker, Received, SqsQueue, open_queue
from dagster_taskiq.step_process import StepOutcome, run_step
from dagster_taskiq.store import Claimed, LeaseStatus, StepState

T = TypeVar('T')
log = get_logger(__name__)

DEFAULT_CONCURRENCY = 4
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_POLL_WAIT_S = 20
STOP_GRACE_S = 10.0  # how long a signalled step process gets to write Dagster's events and exit
STORE_RETRY_VISIBILITY_S = 5  # a message whose claim hit an unreachable database comes back soon
# Modules Dagster imports lazily while it executes a step (~25 ms a step when not preloaded);
# the forkserver skips a name it cannot import, so a Dagster release that moves one costs only time
DAGSTER_STEP_MODULES = (
    'dagster._core.storage.sqlite_storage',
    'dagster._core.system_config.composite_descent',
    'dagster._core.utility_ops',
    'dagster._core.workspace.autodiscovery',
    'dagster._utils.temp_file',
    'dagster._utils.test.definitions',
)


def default_worker_id() -> str:
    return f'{socket.gethostname()}-{os.getpid()}'


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    poll_wait_s: int = DEFAULT_POLL_WAIT_S
    metrics_port: int | None = None
    preload: Sequence[str] = ()
    worker_id: str = field(default_factory=default_worker_id)
    journal_dir: Path = Path('.dagster-taskiq-journal')


@dataclass
class RunningStep:
    task: message.OpExecutionTask
    received: Received
    token: int
    process: BaseProcess
    started_at: float = field(default_factory=time.monotonic)
    released: bool = False


def step_context(preload: Sequence[str]) -> ForkServerContext:
    """A forkserver that has imported dagster, the step runner and the code location modules.

    Every child re-runs the worker's main script (Python 3.11's forkserver ignores '__main__' in
    the preload list), so the CLI it imports is preloaded: the re-run then costs ~1 ms, not the
    ~200 ms of importing the worker. Last, the Dagster instance of DAGSTER_HOME is built once
    (`step_process.warm_up`), after the code location modules, so steps reuse it.
    """
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(
        [
            'dagster',
            'dagster_postgres',
            *DAGSTER_STEP_MODULES,
            'dagster_taskiq.cli',
            'dagster_taskiq.step_process',
            *preload,
            'dagster_taskiq.warm_step_process',
        ]
    )
    return context


async def _exited(process: BaseProcess) -> None:
    """Wait for `process` to exit without blocking the event loop or a thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def mark_done() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(process.sentinel, mark_done)
    try:
        if process.is_alive():
            await done
    finally:
        loop.remove_reader(process.sentinel)
    process.join()


def _sent_outcome(reader: Connection) -> StepOutcome | None:
    """The outcome the step process sent, or None if it died first (EOF on the pipe)."""
    try:
        return reader.recv() if reader.poll() else None
    except EOFError:
        return None


class Worker:
    def __init__(
        self, queue: SqsQueue, engine: AsyncEngine, settings: Settings, options: WorkerOptions
    ) -> None:
        self.queue = queue
        self.engine = engine
        self.settings = settings
        self.options = options
        self.worker_id = options.worker_id
        self.context = step_context(options.preload)
        self.metrics = WorkerMetrics()
        self.db_breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
        self.stop = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.running: dict[str, RunningStep] = {}
        self.message_tasks: set[asyncio.Task[None]] = set()
        self.late_receive: asyncio.Future[list[Received]] | None = None
        self.heartbeat_interval_s = settings.lease_s / 3
        self.log = log.bind(worker_id=self.worker_id)

    # ----- lifecycle -----

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `stop` is set), then drain and return."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        await self._warm_up()
        self.log.info('worker_started', concurrency=self.options.concurrency, pid=os.getpid())
        side_tasks = [
            asyncio.create_task(self._registry_loop(), name='registry'),
            asyncio.create_task(self._journal_loop(), name='journal'),
        ]
        if self.options.metrics_port is not None:
            side_tasks.append(
                asyncio.create_task(
                    serve_health_and_metrics(self, self.options.metrics_port, self.stop),
                    name='health-and-metrics',
                )
            )
        try:
            await self._receive_loop()
        finally:
            await self.shutdown()
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await self._store_call(store.worker_stopped(self.engine, self.worker_id))
            self.log.info('worker_stopped')

    async def _warm_up(self) -> None:
        """Start the forkserver now (it imports dagster once), not on the first step."""
        process = self.context.Process(target=os.getpid, name='warm-up')
        process.start()
        await _exited(process)

    async def shutdown(self) -> None:
        """Let running steps finish within the drain timeout; release the rest."""
        giving_back = asyncio.ensure_future(self._give_back_late_receive())
        if self.message_tasks:
            self.log.info('worker_draining', running=len(self.running))
            await asyncio.wait(self.message_tasks, timeout=self.options.drain_timeout_s)
        for step in list(self.running.values()):
            await self._release(step)
        if self.message_tasks:
            await asyncio.wait(self.message_tasks, timeout=STOP_GRACE_S)
        await giving_back

    async def _release(self, step: RunningStep) -> None:
        """Give an unfinished attempt back: stop its process, end its lease, make it visible."""
        step.released = True
        if step.process.is_alive():
            step.process.kill()  # no Dagster events: the attempt is abandoned and retried
        await self._store_call(
            store.expire_lease(self.engine, step.task.idempotency_key, token=step.token)
        )
        await self._queue_call(self.queue.change_visibility(step.received.receipt_handle, 0))
        self._log_step(step.task, 'step_released', duration_s=time.monotonic() - step.started_at)

    # ----- receiving -----

    def free_slots(self) -> int:
        return self.options.concurrency - len(self.message_tasks)

    async def _receive_loop(self) -> None:
        while not self.stop.is_set():
            if self.free_slots() <= 0:
                self.slot_freed.clear()
                await self._until_stopped(self.slot_freed.wait())
                continue
            pause_s = max(
                self.queue.breaker.seconds_until_probe(), self.db_breaker.seconds_until_probe()
            )
            if pause_s > 0:
                await self._until_stopped(asyncio.sleep(pause_s))
                continue
            try:
                received = await self._receive()
            except CircuitOpen:
                continue
            except TransportError as error:
                self.log.warning('receive_failed', error=str(error))
                continue
            for item in received or []:
                self.metrics.received.inc()
                task = asyncio.create_task(self._handle(item), name=f'message-{item.message_id}')
                self.message_tasks.add(task)
                task.add_done_callback(self._message_done)

    async def _receive(self) -> list[Received]:
        """One long poll's messages; none if the worker is told to stop meanwhile.

        A poll cut short on our side still takes the next message on SQS's side, which would then
        stay invisible for the visibility timeout: so a poll interrupted by the stop is left to
        finish, and `shutdown` gives back what it brings.
        """
        receiving = asyncio.ensure_future(
            self.queue.receive(min(self.free_slots(), 10), wait_s=self.options.poll_wait_s)
        )
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if self.stop.is_set():
            self.late_receive = receiving
            return []
        return receiving.result()

    async def _give_back_late_receive(self) -> None:
        """Make the messages of a poll that ended after the stop visible again at once."""
        if self.late_receive is None:
            return
        try:
            received = await self.late_receive
        except (CircuitOpen, TransportError):
            return
        for item in received:
            self.log.info('message_given_back', message_id=item.message_id)
            await self._queue_call(self.queue.change_visibility(item.receipt_handle, 0))

    def _message_done(self, task: asyncio.Task[None]) -> None:
        self.message_tasks.discard(task)
        self.slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            self.log.error('message_task_crashed', error=repr(task.exception()))

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """`awaitable`'s result, or None (after cancelling it) when the worker is told to stop."""
        work = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None

    # ----- one message -----

    async def _handle(self, received: Received) -> None:
        try:
            task = message.parse(received.body, self.settings.signing_key_bytes)
            message.step_args(task)
        except InvalidMessage as error:
            await self._dead_letter(received, str(error))
            return
        try:
            claim = await self._db(
                store.claim(
                    self.engine,
                    task.idempotency_key,
                    worker_id=self.worker_id,
                    lease_s=self.settings.lease_s,
                )
            )
        except StoreUnavailable as error:
            self._log_step(task, 'claim_deferred', error=str(error))
            await self._queue_call(
                self.queue.change_visibility(received.receipt_handle, STORE_RETRY_VISIBILITY_S)
            )
            return
        if isinstance(claim, Claimed):
            self.metrics.claimed.inc()
            await self._execute(task, received, claim.token)
            return
        if claim.state is None:
            await self._dead_letter(received, f'unknown attempt key {task.idempotency_key}')
            return
        if claim.state is StepState.RUNNING and claim.lease_expired and claim.token is not None:
            reason = await self._store_call(
                store.abandon(self.engine, task.idempotency_key, token=claim.token)
            )
            self._log_step(task, 'step_abandoned', reason=reason, previous_owner=claim.owner)
        self.metrics.duplicates.inc()
        self._log_step(task, 'delivery_refused', state=str(claim.state), owner=claim.owner)
        await self._queue_call(self.queue.delete(received.receipt_handle))

    async def _dead_letter(self, received: Received, reason: str) -> None:
        self.metrics.dead_lettered.inc()
        self.log.warning('message_rejected', reason=reason, message_id=received.message_id)
        try:
            await self.queue.send_to_dlq(received.body, reason, {'message_id': received.message_id})
        except TransportError as error:
            self.log.error('dead_letter_failed', reason=reason, error=str(error))
            return  # keep the message: it comes back, and SQS's own redrive takes it eventually
        await self._queue_call(self.queue.delete(received.receipt_handle))

    async def _execute(self, task: message.OpExecutionTask, received: Received, token: int) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        lifeline, keep_alive = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_step,
            args=(task.execute_step_args, writer, lifeline),
            name=f'step {task.step_key}',
        )
        process.start()
        writer.close()
        lifeline.close()
        step = RunningStep(task=task, received=received, token=token, process=process)
        self.running[task.idempotency_key] = step
        self.metrics.in_flight.inc()
        self._log_step(task, 'step_started', pid=process.pid)
        try:
            stop_reason = await self._supervise(step)
            outcome = _sent_outcome(reader)
        finally:
            reader.close()
            keep_alive.close()
            del self.running[task.idempotency_key]
            self.metrics.in_flight.dec()
        duration_s = time.monotonic() - step.started_at
        self.metrics.step_duration.observe(duration_s)
        if step.released:
            return
        if stop_reason is None:
            await self._finish(step, outcome, duration_s)
        else:
            self._log_step(task, 'step_stopped', reason=stop_reason, duration_s=duration_s)
        await self._queue_call(self.queue.delete(received.receipt_handle))

    async def _supervise(self, step: RunningStep) -> str | None:
        """Heartbeat until the step process exits; the reason it was stopped, if it was."""
        exited = asyncio.ensure_future(_exited(step.process))
        deadline = time.monotonic() + self.settings.lease_s
        stop_reason: str | None = None
        while not exited.done():
            await asyncio.wait({exited}, timeout=self.heartbeat_interval_s)
            if exited.done() or stop_reason is not None or step.released:
                continue
            status = await self._heartbeat(step)
            if status is LeaseStatus.RENEWED:
                deadline = time.monotonic() + self.settings.lease_s
            elif status is LeaseStatus.CANCELLED:
                stop_reason = 'cancelled through Dagster'
                step.process.terminate()  # Dagster's interrupt handling records the termination
                asyncio.get_running_loop().call_later(STOP_GRACE_S, self._kill, step.process)
            elif status is LeaseStatus.LOST:
                stop_reason = 'lease lost: the attempt was abandoned or finished elsewhere'
                step.process.kill()
            elif time.monotonic() >= deadline:
                stop_reason = 'lease could not be renewed before it expired (self-fenced)'
                step.process.kill()
        await exited
        return stop_reason

    @staticmethod
    def _kill(process: BaseProcess) -> None:
        if process.is_alive():
            process.kill()

    async def _heartbeat(self, step: RunningStep) -> LeaseStatus | None:
        """Renew the DB lease and the message's visibility; None when the DB is unreachable."""
        try:
            status = await self._db(
                store.heartbeat(
                    self.engine,
                    step.task.idempotency_key,
                    token=step.token,
                    lease_s=self.settings.lease_s,
                )
            )
        except StoreUnavailable as error:
            self._log_step(step.task, 'heartbeat_failed', error=str(error))
            return None
        if status is LeaseStatus.RENEWED:
            await self._queue_call(
                self.queue.change_visibility(
                    step.received.receipt_handle, self.settings.visibility_timeout_s
                )
            )
        else:
            self._log_step(step.task, 'heartbeat_refused', status=str(status))
        return status

    async def _finish(
        self, step: RunningStep, outcome: StepOutcome | None, duration_s: float
    ) -> None:
        if outcome is None:
            outcome = StepOutcome(error=f'step process exited with code {step.process.exitcode}')
        state = StepState.COMPLETED if outcome.succeeded else StepState.FAILED
        entry = journal.Entry(
            key=step.task.idempotency_key,
            token=step.token,
            outcome=state,
            error=outcome.error,
            effects=outcome.effects,
        )
        try:
            finished = await self._db(journal.write(self.engine, entry))
        except StoreUnavailable as error:
            journal.append(self.options.journal_dir, self.worker_id, entry)
            self._log_step(step.task, 'outcome_journaled', outcome=str(state), error=str(error))
            return
        (self.metrics.completed if outcome.succeeded else self.metrics.failed).inc()
        event = 'step_finished' if finished else 'step_finish_refused'
        self._log_step(step.task, event, outcome=str(state), duration_s=round(duration_s, 3))

    # ----- side tasks -----

    async def _registry_loop(self) -> None:
        while True:
            await self._store_call(
                store.worker_seen(
                    self.engine,
                    self.worker_id,
                    concurrency=self.options.concurrency,
                    running=len(self.running),
                )
            )
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _journal_loop(self) -> None:
        while True:
            if self.db_breaker.seconds_until_probe() == 0:
                try:
                    written = await journal.reconcile(
                        self.options.journal_dir, self.worker_id, self.engine
                    )
                except StoreUnavailable:
                    written = 0
                if written:
                    self.log.info('journal_reconciled', outcomes=written)
            await asyncio.sleep(self.heartbeat_interval_s)

    # ----- calls that may fail -----

    async def _db(self, call: Awaitable[T]) -> T:
        """A store call counted by the database circuit breaker."""
        try:
            result = await call
        except StoreUnavailable:
            self.db_breaker.record_failure()
            raise
        self.db_breaker.record_success()
        return result

    async def _store_call(self, call: Awaitable[T]) -> T | None:
        """A store call whose failure is logged and otherwise ignored."""
        try:
            return await self._db(call)
        except StoreUnavailable as error:
            self.log.warning('store_call_failed', error=str(error))
            return None

    async def _queue_call(self, call: Awaitable[T]) -> T | None:
        """An SQS call whose failure is logged and otherwise ignored (the lease decides)."""
        try:
            return await call
        except TransportError as error:
            self.log.warning('queue_call_failed', error=str(error))
            return None

    def _log_step(self, task: message.OpExecutionTask, event: str, **fields: object) -> None:
        self.log.info(
            event,
            run_id=task.run_id,
            step_key=task.step_key,
            attempt=task.attempt,
            **fields,
        )


async def serve(settings: Settings, options: WorkerOptions) -> None:
    """Open the queue and the store, then run a worker until it is told to stop."""
    engine = store.async_engine(settings.database_url)
    try:
        async with open_queue(settings) as queue:
            await Worker(queue, engine, settings, options).run()
    finally:
        await engine.dispose()
