"""`taskiq_executor`: Dagster's StepDelegatingExecutor with an SQS step handler.

`launch_step` records the attempt QUEUED and sends its `OpExecutionTask`; `check_step_health` reads
the store (an expired lease is abandoned, fenced, and reported unhealthy, so the op's RetryPolicy
runs attempt n+1 under a new key); `terminate_step` marks the attempt CANCELLED. The handler is
sync, as Dagster calls it; it runs the async store and queue on an event loop thread of its own.
"""

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

from dagster import DagsterInstance, Field, IntSource, Noneable, StringSource, executor
from dagster import _check as check
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.execution.tags import get_tag_concurrency_limits_config
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import (
    CheckStepHealthResult,
    StepDelegatingExecutor,
    StepHandler,
    StepHandlerContext,
)
from sqlalchemy.engine import RowMapping

from dagster_taskiq import message
from dagster_taskiq.errors import RunStopping, StoreUnavailable, TransportError
from dagster_taskiq.run_events import RunEvents
from dagster_taskiq.settings import Settings
from dagster_taskiq.step_process import TERMINAL_EVENTS, keep_storage_connections
from dagster_taskiq.store import StepState, Store

if TYPE_CHECKING:
    from dagster_taskiq.sqs import SqsQueue

T = TypeVar('T')

# The longest the executor loop waits between looks at the event log; it looks at once when one of
# the run's steps ends (RunEvents), so this is only the fallback when a notification is missed
DEFAULT_SLEEP_SECONDS = 1.0
IDLE_SLEEP_S = 0.05  # the executor loop's pause while none of the run's steps is in flight
HEALTH_ROWS_FRESH_S = 1.0  # a health check round's rows are not used for longer than this
DEFAULT_HEALTH_CHECK_INTERVAL_S = 5
# An attempt whose message was lost, or that no worker ever takes, fails after this long with its
# reason instead of keeping its run STARTED for ever; long enough for workers to scale from zero
DEFAULT_STEP_QUEUED_TIMEOUT_S = 3600.0
# An attempt still QUEUED this long after its message was sent has its message sent again, to the
# retry queue: SQS may have lost it or redriven it to the DLQ (the claim absorbs a duplicate)
DEFAULT_STEP_RESEND_S = 300.0
LIVE_WORKER_WINDOW_S = 60.0
# executor config keys named as the Settings fields they set; absent keys fall back to the
# DAGSTER_TASKIQ_* / AWS_* variables
_SETTINGS_FIELDS = ('queue_url', 'queue_name', 'aws_endpoint_url', 'aws_region', 'database_url')

TASKIQ_CONFIG = {
    'queue_url': Field(StringSource, is_required=False, description='URL of the step queue.'),
    'queue_name': Field(
        StringSource, is_required=False, description='Name of the step queue (if no queue_url).'
    ),
    'aws_endpoint_url': Field(
        StringSource, is_required=False, description='AWS endpoint (moto, LocalStack); unset: AWS.'
    ),
    'aws_region': Field(StringSource, is_required=False, description='AWS region.'),
    'database_url': Field(
        StringSource, is_required=False, description='PostgreSQL URL of the idempotency store.'
    ),
    'max_concurrent': Field(
        IntSource, is_required=False, description='Most steps of one run queued or running at once.'
    ),
    'tag_concurrency_limits': get_tag_concurrency_limits_config(),  # type: ignore[no-untyped-call]
    'retries': get_retries_config(),  # type: ignore[no-untyped-call]
    'sleep_seconds': Field(
        float,
        default_value=DEFAULT_SLEEP_SECONDS,
        description='Longest wait of the executor loop between looks at the event log; it looks at '
        "once when one of the run's steps ends (a PostgreSQL NOTIFY from the worker).",
    ),
    'check_step_health_interval_seconds': Field(
        int,
        default_value=DEFAULT_HEALTH_CHECK_INTERVAL_S,
        description='How often running steps are checked in the store (lost workers, cancels).',
    ),
    'step_queued_timeout_seconds': Field(
        Noneable(float),
        default_value=DEFAULT_STEP_QUEUED_TIMEOUT_S,
        description='Fail (and cancel) an attempt still queued after this long, naming the queue '
        'depth and the live workers; None: wait however long.',
    ),
    'step_resend_seconds': Field(
        Noneable(float),
        default_value=DEFAULT_STEP_RESEND_S,
        description='Send the message of an attempt still queued this long after its last send '
        'again, to the retry queue (a lost or dead-lettered message strands nothing; a duplicate '
        'is refused by the claim); None: never.',
    ),
}


class _LoopThread:
    """An event loop on a thread of its own, so sync code can await the async store and queue."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class SqsStepHandler(StepHandler):
    def __init__(
        self,
        settings: Settings,
        step_queued_timeout_s: float | None = None,
        step_resend_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.step_queued_timeout_s = step_queued_timeout_s
        self.step_resend_s = step_resend_s
        self._last_sent: dict[str, float] = {}  # attempt key -> time.monotonic() of its last send
        # step key -> attempt key, of the run's steps launched and not yet ended
        self.in_flight: dict[str, str] = {}
        self._health_rows: dict[str, RowMapping] = {}  # see _round_row
        self._health_rows_read_at = 0.0
        self._loop: _LoopThread | None = None
        self._resources = AsyncExitStack()
        self._queue: SqsQueue | None = None  # opened by `prepare`, when the run starts
        self._queue_lock = asyncio.Lock()
        self._store = Store.from_settings(settings)

    @property
    def name(self) -> str:
        return 'SqsStepHandler'

    def _loop_thread(self) -> _LoopThread:
        if self._loop is None:
            self._loop = _LoopThread('dagster-taskiq-executor')
        return self._loop

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop_thread().run(coroutine)

    def prepare(self) -> None:
        """Open the queue in the background while the run starts, not in the first launch.

        Creating the SQS client and resolving the queue URLs takes ~150 ms; a failure here is
        raised again, with its reason, by the launch that needs the queue.
        """
        asyncio.run_coroutine_threadsafe(self._opened_queue(), self._loop_thread().loop)

    async def _opened_queue(self) -> 'SqsQueue':
        # imported here: every code location imports this module (step processes included),
        # and only a run worker sends to SQS (aioboto3 is ~20 MB and ~1.5 s of imports)
        from dagster_taskiq.sqs import open_queue

        async with self._queue_lock:
            if self._queue is None:
                self._queue = await self._resources.enter_async_context(open_queue(self.settings))
            return self._queue

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(self._close())
            self._loop.close()
            self._loop = None

    async def _close(self) -> None:
        async with self._queue_lock:  # after an opening still in progress
            self._resources.push_async_callback(self._store.close)
            await self._resources.aclose()

    # ----- launch -----

    async def _enqueue(self, task: message.OpExecutionTask) -> str | None:
        """Record the attempt QUEUED and send its message: the message id.

        A retry (attempt > 0) goes to the retry queue, ahead of every first attempt. An attempt
        launched before (Dagster relaunches its in-flight steps when it resumes a run) is
        re-attached, never run twice: still QUEUED, its message is sent again, to the retry
        queue (the claim absorbs a duplicate); otherwise nothing is sent (None) and the health
        check follows it. A message that cannot be built records nothing; one that cannot be
        sent leaves its attempt CANCELLED with the reason, not QUEUED for ever.
        """
        body = message.encode(task, self.settings.signing_key_bytes)
        recorded = await self._store.record_enqueued(
            task.idempotency_key,
            run_id=task.run_id,
            job_name=task.job_name,
            step_key=task.step_key,
            attempt=task.attempt,
        )
        if not recorded:
            row = await self._store.get_execution(task.idempotency_key)
            if row is None or row['state'] != StepState.QUEUED:
                return None
        try:
            message_id = await (await self._opened_queue()).send(
                body, message.attributes(task), retry=task.attempt > 0 or not recorded
            )
        except TransportError as error:
            reason = f'its message could not be sent: {error}'
            with contextlib.suppress(StoreUnavailable):  # the send's error is the one to report
                await self._store.cancel(task.idempotency_key, reason=reason, only_queued=True)
            raise
        self._last_sent[task.idempotency_key] = time.monotonic()
        return message_id

    async def _send_again(self, task: message.OpExecutionTask) -> str:
        body = message.encode(task, self.settings.signing_key_bytes)
        message_id = await (await self._opened_queue()).send(
            body, message.attributes(task), retry=True
        )
        self._last_sent[task.idempotency_key] = time.monotonic()
        return message_id

    def launch_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        task = message.build_task(
            step_handler_context.execute_step_args,
            job_name=step_handler_context.dagster_run.job_name,
            enqueued_at=time.time(),
        )
        try:
            message_id = self._run(self._enqueue(task))
        except RunStopping as stopping:
            # The run is CANCELING and its run worker not interrupted yet: nothing more is
            # launched, and TaskiqExecutor.execute cancels what is in flight.
            raise DagsterExecutionInterruptedError(str(stopping)) from stopping
        # Events yielded here are discarded by Dagster, so this one is written, not yielded.
        self.in_flight[task.step_key] = task.idempotency_key
        step_context = step_handler_context.get_step_context(task.step_key)
        if message_id is None:
            DagsterEvent.engine_event(
                step_context,
                f'Attempt {task.attempt} of step "{task.step_key}" was launched before: '
                're-attached to it (its health check follows it)',
                EngineEventData(metadata={'idempotency_key': task.idempotency_key}),
            )
        else:
            DagsterEvent.step_worker_starting(
                step_context,
                f'Queued attempt {task.attempt} of step "{task.step_key}" on SQS.',
                metadata={'idempotency_key': task.idempotency_key, 'message_id': message_id},
            )
        yield from ()

    # ----- health -----

    def _failure_reported(self, context: StepHandlerContext, step_key: str, attempt: int) -> bool:
        """Whether Dagster's event log already ended this attempt (one terminal event each)."""
        records = context.instance.get_records_for_run(
            context.execute_step_args.run_id, of_type=TERMINAL_EVENTS
        ).records
        ended = [r for r in records if r.event_log_entry.step_key == step_key]
        return len(ended) > attempt

    async def _queued_too_long(self, key: str, age_s: float) -> str | None:
        if not await self._store.cancel(
            key, reason=f'still queued after {age_s:.0f} s', only_queued=True
        ):
            return None  # a worker claimed it meanwhile
        depth = await (await self._opened_queue()).depth()
        workers = await self._store.live_workers(LIVE_WORKER_WINDOW_S)
        return (
            f'attempt {key} waited {age_s:.0f} s in the queue '
            f'(> step_queued_timeout_seconds={self.step_queued_timeout_s}); queue depth: '
            f'{depth.visible} visible, {depth.in_flight} in flight; live workers: '
            f'{workers["workers"]} with {workers["running"]}/{workers["slots"]} slots busy'
        )

    async def _round_row(self, key: str) -> RowMapping | None:
        """The attempt's row, read with those of every step in flight: Dagster checks each running
        step in turn, every health check interval; the first check of a round reads all their rows
        in one query, the others take theirs (a run with 100 steps waiting in a backlog makes one
        query a round, not 100). A row is taken once, and not after HEALTH_ROWS_FRESH_S."""
        if time.monotonic() - self._health_rows_read_at > HEALTH_ROWS_FRESH_S:
            self._health_rows = {}
        if key not in self._health_rows:
            keys = {key, *self.in_flight.values()}
            self._health_rows = await self._store.get_executions(sorted(keys))
            self._health_rows_read_at = time.monotonic()
        return self._health_rows.pop(key, None)

    async def _health(self, key: str) -> tuple[str | None, RowMapping | None]:
        """(unhealthy reason or None, the attempt's row) from the store's point of view."""
        row = await self._round_row(key)
        if row is None:
            return f'no record of attempt {key} in the idempotency store', None
        state = row['state']
        if state == StepState.RUNNING and row['abandonable']:
            reason = await self._store.abandon(key, token=row['lease_token'])
            if reason is None:  # renewed, finished or abandoned meanwhile: look again
                return await self._health(key)
            return f'worker lost: {reason}', row
        timeout_s = self.step_queued_timeout_s
        if state == StepState.QUEUED and timeout_s is not None and row['age_s'] > timeout_s:
            return await self._queued_too_long(key, float(row['age_s'])), row
        if state == StepState.ABANDONED:
            return f'worker lost: {row["error"]}', row
        if state == StepState.CANCELLED:
            return f'attempt {key} was cancelled: {row["error"]}', row
        return None, row

    def _send_again_if_due(self, context: StepHandlerContext, step_key: str, key: str) -> None:
        """Send a still-QUEUED attempt's message again, to the retry queue, once it waited
        `step_resend_s` since its last send (lost, or redriven to the DLQ: nothing strands)."""
        sent_at = self._last_sent.setdefault(key, time.monotonic())
        if self.step_resend_s is None or time.monotonic() - sent_at < self.step_resend_s:
            return
        job_name = context.dagster_run.job_name
        task = message.build_task(context.execute_step_args, job_name, enqueued_at=time.time())
        try:
            message_id = self._run(self._send_again(task))
        except TransportError as error:  # the next health check tries again
            text, metadata = f'Could not send attempt {task.attempt} again: {error}', {}
        else:
            text = (
                f'Attempt {task.attempt} of step "{step_key}" still queued '
                f'{self.step_resend_s:.0f} s after its message was sent: sent again, to the '
                'retry queue (a duplicate is refused by the claim)'
            )
            metadata = {'message_id': message_id}
        DagsterEvent.engine_event(
            context.get_step_context(step_key), text, EngineEventData(metadata=metadata)
        )

    def check_step_health(self, step_handler_context: StepHandlerContext) -> CheckStepHealthResult:
        step_key, attempt, key = message.step_identity(step_handler_context.execute_step_args)
        reason, row = self._run(self._health(key))
        if reason is not None:
            return CheckStepHealthResult.unhealthy(reason)
        if row is not None and row['state'] == StepState.QUEUED:
            self._send_again_if_due(step_handler_context, step_key, key)
        if (
            row is not None
            and row['state'] == StepState.FAILED
            and not self._failure_reported(step_handler_context, step_key, attempt)
        ):
            return CheckStepHealthResult.unhealthy(
                f'worker {row["owner"]} failed attempt {key} before Dagster recorded an '
                f'outcome: {row["error"]}'
            )
        return CheckStepHealthResult.healthy()

    # ----- terminate -----

    def cancel_run(self, run_id: str) -> None:
        """Cancel every attempt of the run still queued or running (the run is being stopped)."""
        self._run(self._store.cancel_run(run_id, reason='run terminated'))

    def terminate_step(self, step_handler_context: StepHandlerContext) -> Iterator[DagsterEvent]:
        step_key, _, key = message.step_identity(step_handler_context.execute_step_args)
        cancelled = self._run(self._store.cancel(key, reason='run terminated'))
        DagsterEvent.engine_event(
            step_handler_context.get_step_context(step_key),
            f'Cancelled attempt {key}' if cancelled else f'Attempt {key} had already ended',
            EngineEventData(),
        )
        yield from ()


class TaskiqExecutor(StepDelegatingExecutor):
    """Opens the step handler's queue as the run starts and closes its connections at the end;
    its loop waits for one of the run's steps to end instead of sleeping a fixed interval."""

    def __init__(self, step_handler: SqsStepHandler, **kwargs: Any) -> None:
        self.run_events: RunEvents | None = None
        super().__init__(step_handler, **kwargs)
        self.sqs_step_handler = step_handler

    # StepDelegatingExecutor's loop ends each turn with `time.sleep(self._sleep_seconds)`: reading
    # it waits until one of the run's steps ends (at most sleep_seconds) and leaves nothing to
    # sleep. With no step in flight (the run is complete, or waits for a retry's delay or a
    # concurrency slot) there is no end to wait for: a short pause, as before.
    @property
    def _sleep_seconds(self) -> float:
        if not self.sqs_step_handler.in_flight:
            return min(self.max_wait_s, IDLE_SLEEP_S)
        if self.run_events is None:
            return self.max_wait_s
        self.run_events.wait(self.max_wait_s)
        return 0.0

    @_sleep_seconds.setter
    def _sleep_seconds(self, seconds: float) -> None:
        self.max_wait_s = seconds

    def _pop_events(
        self, instance: DagsterInstance, run_id: str, seen_storage_ids: set[int]
    ) -> Sequence[DagsterEvent]:
        events = super()._pop_events(instance, run_id, seen_storage_ids)
        for event in events:  # the events on which the loop stops tracking a running step
            if event.is_step_success or event.is_step_failure or event.is_step_up_for_retry:
                self.sqs_step_handler.in_flight.pop(check.not_none(event.step_key), None)
        return events

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[DagsterEvent]:
        self.sqs_step_handler.prepare()
        postgres_url = getattr(plan_context.instance.event_log_storage, 'postgres_url', None)
        if postgres_url is not None:
            self.run_events = RunEvents(postgres_url, plan_context.run_id)
        try:
            yield from super().execute(plan_context, execution_plan)
        except DagsterExecutionInterruptedError:
            self.sqs_step_handler.cancel_run(plan_context.run_id)
            raise
        finally:
            if self.run_events is not None:
                self.run_events.close()
                self.run_events = None
            self.sqs_step_handler.close()


def settings_from_config(config: Mapping[str, Any]) -> Settings:
    overrides = {key: config[key] for key in _SETTINGS_FIELDS if key in config}
    return Settings(**overrides)


@executor(
    name='taskiq',
    config_schema=TASKIQ_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def taskiq_executor(init_context: InitExecutorContext) -> Executor:
    """Runs each step of the run on dagster-taskiq workers fed by an SQS queue.

    Workers (`dagster-taskiq worker`) must reach the same Dagster instance (PostgreSQL storage) and
    the same code. Give ops a RetryPolicy: a step whose worker is lost is retried as a new attempt
    only under one; without it the step fails with a message naming the lost worker.
    """
    config: Mapping[str, Any] = init_context.executor_config
    keep_storage_connections(init_context.instance)
    return TaskiqExecutor(
        step_handler=SqsStepHandler(
            settings_from_config(config),
            config['step_queued_timeout_seconds'],
            config['step_resend_seconds'],
        ),
        retries=check.not_none(RetryMode.from_config(config['retries'])),
        max_concurrent=config.get('max_concurrent'),
        tag_concurrency_limits=config.get('tag_concurrency_limits'),
        sleep_seconds=config['sleep_seconds'],
        check_step_health_interval_seconds=config['check_step_health_interval_seconds'],
        should_verify_step=True,
    )
