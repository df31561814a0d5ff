"""The worker: long-polls SQS, claims each step attempt in the store, hands it to be run.

Shape: `run()` starts the step runner and supervised side tasks (the worker registry heartbeat,
the journal reconciler, the reaper of expired leases; one that crashes stops the worker), then a
receive loop that takes at most as many messages as it has free slots and starts one task per
message. Each task parses and claims its attempt; a won claim goes to the `AttemptSupervisor`
(attempts.py: start the step through the step runner, keep its lease, finish it, fenced), a
refused one is deleted and counted, a message that cannot be parsed or verified goes to the
dead-letter queue. Only the stop event stops the worker (`serve` maps SIGTERM/SIGINT to it);
`shutdown()` drains, then releases what is left.
"""

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dagster._core.instance.ref import InstanceRef

from dagster_taskiq import journal, message
from dagster_taskiq.attempts import (
    STOP_GRACE_S,
    AttemptSupervisor,
    log_step,
    queue_call,
    store_call,
)
from dagster_taskiq.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_JOURNAL_DIR,
    DEFAULT_POLL_WAIT_S,
)
from dagster_taskiq.errors import (
    CircuitOpen,
    ConfigError,
    DagsterTaskiqError,
    InvalidMessage,
    QueueMissing,
    StoreUnavailable,
    TransportError,
)
from dagster_taskiq.logs import get_logger
from dagster_taskiq.metrics import WorkerMetrics, health_and_metrics_server
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import Received, SqsQueue, open_queue
from dagster_taskiq.step_runner import ForkserverStepRunner, StepRunner
from dagster_taskiq.store import Claimed, StepState, Store

T = TypeVar('T')
log = get_logger(__name__)

STORE_RETRY_VISIBILITY_S = 5  # a message whose claim hit an unreachable database comes back soon


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
    journal_dir: Path = DEFAULT_JOURNAL_DIR
    allow_unsigned: bool = False  # without a signing key, run unsigned messages (else refuse)


async def until_set(event: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """`awaitable`'s result, or None (after cancelling it) once `event` is set."""
    work = asyncio.ensure_future(awaitable)
    setting = asyncio.ensure_future(event.wait())
    await asyncio.wait({work, setting}, return_when=asyncio.FIRST_COMPLETED)
    setting.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None


def supervised(
    coroutine: Coroutine[Any, Any, None],
    name: str,
    on_crash: Callable[[str, BaseException], None],
) -> asyncio.Task[None]:
    """A side task whose crash is reported to `on_crash` (procrastinate's side-task monitor)."""

    def ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            on_crash(name, error)

    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(ended)
    return task


class Worker:
    def __init__(
        self,
        queue: SqsQueue,
        store: Store,
        runner: StepRunner,
        settings: Settings,
        options: WorkerOptions,
        instance_storage: message.InstanceStorage = None,
    ) -> None:
        self.queue = queue
        self.instance_storage = instance_storage  # messages must name this Dagster instance
        self.store = store
        self.runner = runner
        self.settings = settings
        self.options = options
        self.worker_id = options.worker_id
        self.metrics = WorkerMetrics()
        self.stop = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.message_tasks: set[asyncio.Task[None]] = set()
        self.late_receive: asyncio.Future[list[Received]] | None = None
        # how many copies of each attempt key's message this worker is handling right now
        self.handling: Counter[str] = Counter()
        self.crash: str | None = None  # why a side task stopped the worker
        self.log = log.bind(worker_id=self.worker_id)
        self.journal = journal.Journal(options.journal_dir, self.worker_id, self.log)
        self.attempts = AttemptSupervisor(
            queue,
            store,
            runner,
            settings,
            self.journal,
            self.worker_id,
            self.metrics,
            self.log,
        )

    # ----- lifecycle -----

    async def run(self) -> None:
        """Serve until `stop` is set, then drain, write what the journal holds, and return."""
        self.journal.open()
        try:
            await self.runner.start()
            self.log.info('worker_started', concurrency=self.options.concurrency, pid=os.getpid())
            side_tasks = [
                supervised(self._registry_loop(), 'registry', self._side_task_crashed),
                supervised(self._journal_loop(), 'journal', self._side_task_crashed),
                supervised(self._reaper_loop(), 'reaper', self._side_task_crashed),
            ]
            try:
                await self._receive_loop()
            finally:
                await self.shutdown()
                self.runner.close()
                for task in side_tasks:
                    task.cancel()
                await asyncio.gather(*side_tasks, return_exceptions=True)
                try:
                    await self._reconcile_journal()  # what is still unwritten stays for any worker
                except OSError as error:
                    self.log.error('journal_unreadable', error=str(error))
                await store_call(self.store.worker_stopped(self.worker_id), self.log)
                self.log.info('worker_stopped')
        finally:
            self.journal.close()

    def request_stop(self, why: str) -> None:
        self.log.info('worker_stopping', reason=why, running=len(self.attempts.running))
        self.stop.set()

    def _side_task_crashed(self, name: str, error: BaseException) -> None:
        self.crash = f'side task {name} crashed: {error!r}'
        self.log.error('side_task_crashed', task=name, exc_info=error)
        self.request_stop(self.crash)

    def health(self) -> Mapping[str, object]:
        return {
            'status': 'stopping' if self.stop.is_set() else 'ok',
            'worker_id': self.worker_id,
            'running': len(self.attempts.running),
            'concurrency': self.options.concurrency,
            'sqs_breaker': str(self.queue.breaker.state),
            'db_breaker': str(self.store.breaker.state),
        }

    async def shutdown(self) -> None:
        """Let running steps finish within the drain timeout; release the rest."""
        giving_back = asyncio.ensure_future(self._give_back_late_receive())
        if self.message_tasks:
            self.log.info('worker_draining', running=len(self.attempts.running))
            await asyncio.wait(self.message_tasks, timeout=self.options.drain_timeout_s)
        for step in list(self.attempts.running.values()):
            await self.attempts.release(step)
        if self.message_tasks:
            await asyncio.wait(self.message_tasks, timeout=STOP_GRACE_S)
        await giving_back

    # ----- receiving -----

    def free_slots(self) -> int:
        return self.options.concurrency - len(self.message_tasks)

    async def _receive_loop(self) -> None:
        failures = 0
        while not self.stop.is_set():
            if self.free_slots() <= 0:
                self.slot_freed.clear()
                await until_set(self.stop, self.slot_freed.wait())
                continue
            pause_s = max(
                self.queue.breaker.seconds_until_probe(), self.store.breaker.seconds_until_probe()
            )
            if pause_s > 0:
                await until_set(self.stop, asyncio.sleep(pause_s))
                continue
            if self.store.breaker.failures and not await self._store_answers():
                failures += 1  # cut off from the store: take no message it could not claim
                await until_set(self.stop, asyncio.sleep(self._backoff_s(failures)))
                continue
            try:
                received = await self._receive()
            except CircuitOpen:
                continue  # the next turn waits for the probe
            except TransportError as error:  # back off: some errors no retry can fix
                failures += 1
                retry_in_s = self._backoff_s(failures)
                event = 'queue_missing' if isinstance(error, QueueMissing) else 'receive_failed'
                self.log.warning(event, error=str(error), retry_in_s=retry_in_s)
                await until_set(self.stop, asyncio.sleep(retry_in_s))
                continue
            failures = 0
            for item in received:
                self.metrics.received.inc()
                task = asyncio.create_task(self._handle(item), name=f'message-{item.message_id}')
                self.message_tasks.add(task)
                task.add_done_callback(self._message_done)

    async def _store_answers(self) -> bool:
        """After a failed store call: whether the store answers now (else a message received
        would wait out a claim's timeout here instead of going to a worker that can claim it)."""
        try:
            await until_set(self.stop, self.store.ping())
        except StoreUnavailable as error:
            self.log.warning('store_unreachable', error=str(error))
            return False
        return True

    def _backoff_s(self, failures: int) -> float:
        """1, 2, 4, 8, 16 s (by default) after 1, 2, 3, 4, 5+ failed receives in a row."""
        return float(
            min(self.settings.retry_max_s, self.settings.retry_base_s * 2 ** (failures - 1))
        )

    async def _receive(self) -> list[Received]:
        """One long poll's messages; none if the worker is told to stop meanwhile.

        A poll cut short on our side still takes the next message on SQS's side, which would then
        stay invisible for the visibility timeout: so a poll interrupted by the stop is left to
        finish, and `shutdown` gives back what it brings.
        """
        receiving = asyncio.ensure_future(
            self.queue.receive(min(self.free_slots(), 10), wait_s=self.options.poll_wait_s)
        )
        self.log.debug('receive_started', wait_s=self.options.poll_wait_s)  # goes out, stop or not
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
        except TransportError:
            return
        for item in received:
            self.log.info('message_given_back', message_id=item.message_id)
            await queue_call(self.queue.change_visibility(item, 0), self.log)

    def _message_done(self, task: asyncio.Task[None]) -> None:
        self.message_tasks.discard(task)
        self.slot_freed.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            self.log.error('message_task_crashed', exc_info=error)

    # ----- one message -----

    async def _handle(self, received: Received) -> None:
        try:
            task = message.parse(received.body, self.settings.signing_key_bytes)
            message.check_instance(message.step_args(task), self.instance_storage)
        except InvalidMessage as error:
            await self._dead_letter(received, str(error))
            return
        self.handling[task.idempotency_key] += 1
        try:
            await self._claim_and_run(task, received)
        finally:
            self.handling[task.idempotency_key] -= 1
            if not self.handling[task.idempotency_key]:
                del self.handling[task.idempotency_key]

    async def _claim_and_run(self, task: message.OpExecutionTask, received: Received) -> None:
        key = task.idempotency_key
        await self.runner.ready()
        claim_sent_at = time.monotonic()
        try:
            claim = await self.store.claim(
                key, worker_id=self.worker_id, lease_s=self.settings.lease_s
            )
        except StoreUnavailable as error:
            log_step(self.log, task, 'claim_deferred', error=str(error))
            await queue_call(
                self.queue.change_visibility(received, STORE_RETRY_VISIBILITY_S),
                self.log,
            )
            return
        if isinstance(claim, Claimed):
            self.metrics.claimed.inc()
            await self.attempts.execute(task, received, claim.token, claim_sent_at)
            return
        if claim.state is None:
            await self._dead_letter(received, f'unknown attempt key {key}')
            return
        # our own attempt, and no other copy of its message in hand here (which may be the one
        # that claimed it and is starting its step): our claim's answer was lost
        if claim.owner == self.worker_id and self.handling[key] == 1:
            claim_sent_at = time.monotonic()
            reclaimed = await store_call(
                self.store.reclaim(key, worker_id=self.worker_id, lease_s=self.settings.lease_s),
                self.log,
            )
            if reclaimed is not None:  # our claim committed, its answer was lost
                log_step(self.log, task, 'step_reclaimed', state=str(claim.state))
                await self.attempts.execute(task, received, reclaimed.token, claim_sent_at)
                return
        if claim.state is StepState.RUNNING and claim.abandonable and claim.token is not None:
            reason = await store_call(self.store.abandon(key, token=claim.token), self.log)
            log_step(self.log, task, 'step_abandoned', reason=reason, previous_owner=claim.owner)
        self.metrics.duplicates.inc()
        log_step(self.log, task, 'delivery_refused', state=str(claim.state), owner=claim.owner)
        await queue_call(self.queue.delete(received), self.log)

    async def _dead_letter(self, received: Received, reason: str) -> None:
        self.metrics.dead_lettered.inc()
        self.log.warning('message_rejected', reason=reason, message_id=received.message_id)
        try:
            await self.queue.send_to_dlq(received.body, reason, {'message_id': received.message_id})
        except TransportError as error:
            self.log.error('dead_letter_failed', reason=reason, error=str(error))
            return  # keep the message: it comes back, and SQS's own redrive takes it eventually
        await queue_call(self.queue.delete(received), self.log)

    # ----- side tasks -----

    async def _registry_loop(self) -> None:
        while True:
            await store_call(
                self.store.worker_seen(
                    self.worker_id,
                    concurrency=self.options.concurrency,
                    running=len(self.attempts.running),
                ),
                self.log,
            )
            await asyncio.sleep(self.attempts.heartbeat_interval_s)

    async def _reaper_loop(self) -> None:
        """Abandon expired leases every lease period, in case their run worker is gone too."""
        while True:
            await asyncio.sleep(self.settings.lease_s)
            reaped = await store_call(self.store.reap_expired(), self.log)
            if reaped:
                self.log.info('leases_reaped', keys=reaped)

    async def _journal_loop(self) -> None:
        while True:
            if self.store.breaker.seconds_until_probe() == 0:
                await self._reconcile_journal()
            await asyncio.sleep(self.attempts.heartbeat_interval_s)

    async def _reconcile_journal(self) -> None:
        try:
            reconciled = await self.journal.reconcile(self.store)
        except StoreUnavailable:
            return
        if reconciled.written or reconciled.set_aside:
            self.log.info(
                'journal_reconciled', outcomes=reconciled.written, set_aside=reconciled.set_aside
            )


def own_instance_ref() -> InstanceRef:
    """The Dagster instance of DAGSTER_HOME: the only one this worker runs steps against."""
    home = os.environ.get('DAGSTER_HOME')
    if not home:
        raise ConfigError(
            'DAGSTER_HOME is not set: a worker runs steps only against its own Dagster instance '
            '(the dagster.yaml of the run workers, on the same PostgreSQL storage)'
        )
    try:
        return InstanceRef.from_dir(home)
    except Exception as error:  # Dagster raises several types for a bad home
        raise ConfigError(f'DAGSTER_HOME={home} is not a usable Dagster home: {error}') from error


async def serve(settings: Settings, options: WorkerOptions) -> None:
    """Open the queue and the store, then run a worker until SIGTERM/SIGINT.

    Raises DagsterTaskiqError (after the drain) when a side task crashed the worker.
    """
    if settings.signing_key is None and not options.allow_unsigned:
        raise ConfigError(
            'no signing key: set DAGSTER_TASKIQ_SIGNING_KEY (the run workers need the same one), '
            'or start with --allow-unsigned to run messages anyone who can send to the queue wrote'
        )
    storage = message.instance_storage(own_instance_ref())
    store = Store.from_settings(settings)
    try:
        await store.check_schema()
        await store.check_dagster_storage()
        async with open_queue(settings) as queue:
            runner = ForkserverStepRunner(options.preload)
            worker = Worker(queue, store, runner, settings, options, storage)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, worker.request_stop, signal.Signals(signum).name)
            if options.metrics_port is None:
                await worker.run()
            else:
                registry = worker.metrics.registry
                async with health_and_metrics_server(options.metrics_port, registry, worker.health):
                    await worker.run()
            if worker.crash is not None:
                raise DagsterTaskiqError(f'worker {options.worker_id} stopped: {worker.crash}')
    finally:
        await store.close()
