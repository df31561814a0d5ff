"""Claimed attempts, from start to end: the worker keeps each one's lease while its step runs.

`AttemptSupervisor.execute` starts the step through the step runner, heartbeats every lease/3
(the store's lease, fenced on the claim's token, and the message's visibility), stops the step
when the attempt is cancelled (interrupt), lost (kill) or its lease could not be renewed in time
(kill: self-fencing), records how it ended (fenced; journaled when the database is unreachable)
and deletes the message. `release` gives an attempt back unfinished (a draining worker's last act).
"""

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from dagster_taskiq import journal
from dagster_taskiq.errors import StoreUnavailable, TransportError
from dagster_taskiq.logs import FilteringBoundLogger
from dagster_taskiq.message import OpExecutionTask
from dagster_taskiq.metrics import WorkerMetrics
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import Received, SqsQueue
from dagster_taskiq.step_process import StepOutcome
from dagster_taskiq.step_runner import StepRun, StepRunner
from dagster_taskiq.store import LeaseStatus, StepState, Store

T = TypeVar('T')

STOP_GRACE_S = 10.0  # how long an interrupted step process gets to write Dagster's events and exit
CANCELLED_REASON = 'cancelled through Dagster'
# The worker kills a step this share of its lease before the lease can expire (kill latency,
# the request's time on the wire, clock rate differences); lease 30 s: 6 s before
KILL_MARGIN_FRACTION = 0.2


@dataclass
class RunningStep:
    task: OpExecutionTask
    received: Received
    token: int
    lease_sent_at: float  # time.monotonic() when the claim that won the lease was sent
    run: StepRun
    started_at: float = field(default_factory=time.monotonic)
    released: bool = False
    visibility: 'asyncio.Future[None] | None' = None  # the message's visibility being extended


def kill_deadline(sent_at: float, lease_s: float) -> float:
    """When a step must be dead unless its lease is renewed again, for a lease won or renewed by
    a request sent at `sent_at`: a margin before the store's expiry, which counts from later."""
    return sent_at + lease_s * (1 - KILL_MARGIN_FRACTION)


async def store_call(call: Awaitable[T], logger: FilteringBoundLogger) -> T | None:
    """A store call whose failure (StoreUnavailable) is logged and otherwise ignored."""
    try:
        return await call
    except StoreUnavailable as error:
        logger.warning('store_call_failed', error=str(error))
        return None


async def queue_call(call: Awaitable[T], logger: FilteringBoundLogger) -> T | None:
    """An SQS call whose failure is logged and otherwise ignored (the lease decides)."""
    try:
        return await call
    except TransportError as error:
        logger.warning('queue_call_failed', error=str(error))
        return None


def log_step(
    logger: FilteringBoundLogger, task: OpExecutionTask, event: str, **fields: object
) -> None:
    """One line per state transition of a step attempt."""
    logger.info(event, run_id=task.run_id, step_key=task.step_key, attempt=task.attempt, **fields)


class AttemptSupervisor:
    def __init__(
        self,
        queue: SqsQueue,
        store: Store,
        runner: StepRunner,
        settings: Settings,
        outcome_journal: journal.Journal,
        worker_id: str,
        metrics: WorkerMetrics,
        logger: FilteringBoundLogger,
    ) -> None:
        self.queue = queue
        self.store = store
        self.runner = runner
        self.settings = settings
        self.journal = outcome_journal
        self.worker_id = worker_id
        self.metrics = metrics
        self.log = logger
        self.running: dict[str, RunningStep] = {}
        self.heartbeat_interval_s = settings.lease_s / 3

    async def execute(
        self, task: OpExecutionTask, received: Received, token: int, claim_sent_at: float
    ) -> None:
        """Run a claimed attempt to its end, then delete its message (unless it was released).

        `claim_sent_at`: time.monotonic() when the claim that won the lease was sent.
        """
        step = RunningStep(task, received, token, claim_sent_at, run=await self.runner.run(task))
        self.running[task.idempotency_key] = step
        self.metrics.in_flight.inc()
        log_step(self.log, task, 'step_started', pid=step.run.pid)
        try:
            outcome, stop_reason = await self._supervise(step)
        finally:
            del self.running[task.idempotency_key]
            self.metrics.in_flight.dec()
        duration_s = time.monotonic() - step.started_at
        self.metrics.step_duration.observe(duration_s)
        if step.released and outcome.dagster_event is None:
            return  # given back unfinished: it is retried
        # a step that ended by itself just as it was released still has its outcome written
        if stop_reason is None:
            await self._finish(step, outcome, duration_s)
        else:
            log_step(self.log, task, 'step_stopped', reason=stop_reason, duration_s=duration_s)
            if stop_reason == CANCELLED_REASON and outcome.dagster_event is not None:
                await store_call(
                    self.store.record_cancelled_event(
                        task.idempotency_key, token=token, dagster_event=outcome.dagster_event
                    ),
                    self.log,
                )
        await queue_call(self.queue.delete(received), self.log)

    async def release(self, step: RunningStep) -> None:
        """Give an unfinished attempt back: stop its process, end its lease, make it visible."""
        step.released = True
        step.run.kill()  # no Dagster events: the attempt is abandoned and retried
        key = step.task.idempotency_key
        await store_call(self.store.expire_lease(key, token=step.token), self.log)
        await queue_call(self.queue.change_visibility(step.received, 0), self.log)
        duration_s = time.monotonic() - step.started_at
        log_step(self.log, step.task, 'step_released', duration_s=duration_s)

    async def _supervise(self, step: RunningStep) -> tuple[StepOutcome, str | None]:
        """Heartbeat until the step ends: its outcome, and the reason it was stopped, if it was.

        The step dies before its lease can expire: the kill deadline counts from before the
        request that won or renewed the lease was sent (the store's expiry counts from its
        arrival), less a margin; a heartbeat may take only the time left until that deadline,
        and the step process kills itself at the same deadline if the worker cannot.
        """
        ended = asyncio.ensure_future(step.run.outcome())
        deadline = kill_deadline(step.lease_sent_at, self.settings.lease_s)
        step.run.extend(deadline - time.monotonic())
        next_beat = time.monotonic() + self.heartbeat_interval_s
        stop_reason: str | None = None
        while stop_reason is None and not step.released:
            wake_in_s = min(next_beat, deadline) - time.monotonic()
            await asyncio.wait({ended}, timeout=max(0.0, wake_in_s))
            if ended.done() or step.released:
                break
            sent_at = time.monotonic()
            if sent_at >= deadline:
                stop_reason = 'lease could not be renewed before it expired (self-fenced)'
                step.run.kill()
            elif sent_at >= next_beat:
                next_beat = sent_at + self.heartbeat_interval_s
                status = await self._heartbeat(step, timeout_s=deadline - sent_at)
                if status is LeaseStatus.RENEWED:
                    deadline = kill_deadline(sent_at, self.settings.lease_s)
                    step.run.extend(deadline - time.monotonic())
                elif status is LeaseStatus.CANCELLED:
                    stop_reason = CANCELLED_REASON
                    step.run.interrupt()  # Dagster's interrupt handling records the termination
                    asyncio.get_running_loop().call_later(STOP_GRACE_S, step.run.kill)
                elif status is LeaseStatus.LOST:
                    stop_reason = 'lease lost: the attempt was abandoned or finished elsewhere'
                    step.run.kill()
        outcome = await ended
        if step.visibility is not None:
            step.visibility.cancel()
        return outcome, stop_reason

    async def _heartbeat(self, step: RunningStep, timeout_s: float) -> LeaseStatus | None:
        """Renew the DB lease within `timeout_s`, then, in the background, the message's
        visibility (SQS being slow or cut off must not hold up the lease); None on failure."""
        key, lease_s = step.task.idempotency_key, self.settings.lease_s
        try:
            status = await asyncio.wait_for(
                self.store.heartbeat(key, token=step.token, lease_s=lease_s), timeout_s
            )
        except TimeoutError:
            self.store.breaker.record_failure()
            log_step(
                self.log, step.task, 'heartbeat_failed', error=f'no answer in {timeout_s:.2f} s'
            )
            return None
        except StoreUnavailable as error:
            log_step(self.log, step.task, 'heartbeat_failed', error=str(error))
            return None
        if status is not LeaseStatus.RENEWED:
            log_step(self.log, step.task, 'heartbeat_refused', status=str(status))
        elif step.visibility is None or step.visibility.done():  # one extension at a time
            step.visibility = asyncio.ensure_future(self._extend_visibility(step))
        return status

    async def _extend_visibility(self, step: RunningStep) -> None:
        """Keep the message invisible while the step runs, within one heartbeat interval."""
        extension = self.queue.change_visibility(step.received, self.settings.visibility_timeout_s)
        try:
            await asyncio.wait_for(extension, self.heartbeat_interval_s)
        except (TransportError, TimeoutError) as error:
            log_step(self.log, step.task, 'visibility_not_extended', error=str(error) or 'timeout')

    async def _finish(self, step: RunningStep, outcome: StepOutcome, duration_s: float) -> None:
        state = StepState.COMPLETED if outcome.succeeded else StepState.FAILED
        key, token = step.task.idempotency_key, step.token
        try:
            finished = await self.store.finish(
                key,
                token=token,
                outcome=state,
                error=outcome.error,
                effects=outcome.effects,
                dagster_event=outcome.dagster_event,
            )
        except StoreUnavailable as error:
            entry = journal.Entry(
                key, token, state, outcome.error, outcome.effects, outcome.dagster_event
            )
            self.journal.append(entry)
            log_step(self.log, step.task, 'outcome_journaled', outcome=str(state), error=str(error))
            return
        (self.metrics.completed if outcome.succeeded else self.metrics.failed).inc()
        event = 'step_finished' if finished else 'step_finish_refused'
        log_step(self.log, step.task, event, outcome=str(state), duration_s=duration_s)
