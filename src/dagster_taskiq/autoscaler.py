"""The auto-scaler: a pure policy from queue depth to a desired worker count, and its loop.

`decide` is a pure function of its inputs. The loop reads the queue's depth and the ECS service's
counts each poll, asks `decide`, writes `UpdateService(desiredCount)` when the count changes and
records every decision in `scaling_events`. The same code runs against AWS and the emulator.
"""

import asyncio
import math
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import aioboto3

from dagster_taskiq.defaults import (
    DEFAULT_ACTIVATION_THRESHOLD,
    DEFAULT_MAX_WORKERS,
    DEFAULT_MIN_WORKERS,
    DEFAULT_SCALE_DOWN_STABILISATION_S,
    DEFAULT_TARGET_BACKLOG_PER_WORKER,
)
from dagster_taskiq.errors import StoreUnavailable, TransportError
from dagster_taskiq.logs import get_logger
from dagster_taskiq.resilience import CircuitBreaker, aws_client_config, guarded_call
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import SqsQueue, open_queue
from dagster_taskiq.store import Store

if TYPE_CHECKING:
    from types_aiobotocore_ecs.client import ECSClient
else:
    ECSClient = object

log = get_logger(__name__)


@dataclass(frozen=True)
class ScalingPolicy:
    min_workers: int = DEFAULT_MIN_WORKERS
    max_workers: int = DEFAULT_MAX_WORKERS
    target_backlog_per_worker: int = DEFAULT_TARGET_BACKLOG_PER_WORKER
    scale_down_stabilisation_s: float = DEFAULT_SCALE_DOWN_STABILISATION_S
    activation_threshold: int = DEFAULT_ACTIVATION_THRESHOLD
    max_step_up: int | None = None  # most workers added by one decision; None: no cap

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(
                f'need 0 <= min <= max and max >= 1, got {self.min_workers}, {self.max_workers}'
            )
        if self.target_backlog_per_worker < 1 or self.activation_threshold < 1:
            raise ValueError('target_backlog_per_worker and activation_threshold must be >= 1')
        if self.max_step_up is not None and self.max_step_up < 1:
            raise ValueError('max_step_up must be >= 1')


@dataclass(frozen=True)
class Observation:
    """What the loop saw at `at` (seconds): the queue's depth and the service's counts."""

    at: float
    visible: int
    in_flight: int
    delayed: int
    desired: int
    running: int


@dataclass(frozen=True)
class Recommendation:
    at: float
    workers: int


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: int  # what the backlog alone asks for; the loop keeps these as history
    reason: str


def _clamp(value: int, policy: ScalingPolicy) -> int:
    return max(policy.min_workers, min(policy.max_workers, value))


def recommend(observation: Observation, policy: ScalingPolicy) -> int:
    """Workers the backlog asks for: ceil((visible + in_flight) / target), within [min, max].

    From zero, the visible messages must reach the activation threshold first.
    """
    idle = observation.desired == 0 and observation.in_flight == 0
    if idle and observation.visible < policy.activation_threshold:
        return policy.min_workers
    backlog = observation.visible + observation.in_flight
    wanted = math.ceil(backlog / policy.target_backlog_per_worker)
    if wanted == 0 and observation.delayed > 0:
        wanted = 1  # a delayed message is work that is coming: do not scale to zero under it
    return _clamp(wanted, policy)


def decide(
    observation: Observation, history: Sequence[Recommendation], policy: ScalingPolicy
) -> Decision:
    """The desired worker count: up at once (capped by max_step_up), down only when no higher
    recommendation was made within the stabilisation window, never below in-flight work's need."""
    current = observation.desired
    recommendation = recommend(observation, policy)
    if recommendation > current:
        step = recommendation if policy.max_step_up is None else current + policy.max_step_up
        desired = _clamp(min(recommendation, step), policy)
        return Decision(desired, recommendation, f'scale up: backlog asks for {recommendation}')
    if recommendation == current:
        return Decision(_clamp(current, policy), recommendation, 'steady')
    window_start = observation.at - policy.scale_down_stabilisation_s
    recent = [r.workers for r in history if r.at > window_start]
    highest = max([recommendation, *recent])
    in_flight_need = _clamp(
        math.ceil(observation.in_flight / policy.target_backlog_per_worker), policy
    )
    desired = _clamp(min(current, max(highest, in_flight_need)), policy)
    if desired == current:
        reason = f'hold: {highest} recommended within {policy.scale_down_stabilisation_s:.0f} s'
    else:
        reason = f'scale down: highest recommendation in the window is {highest}'
    return Decision(desired, recommendation, reason)


@asynccontextmanager
async def ecs_client(settings: Settings) -> AsyncIterator[ECSClient]:
    session = aioboto3.Session(region_name=settings.aws_region)
    async with session.client(
        'ecs', endpoint_url=settings.ecs_endpoint, config=aws_client_config()
    ) as client:
        yield client


class EcsService:
    """The worker service on ECS (AWS, or the emulator with the local ECS agent)."""

    def __init__(self, client: ECSClient, cluster: str, service: str, settings: Settings) -> None:
        self.client = client
        self.cluster = cluster
        self.service = service
        self.settings = settings
        self.breaker = CircuitBreaker.from_settings(settings)

    async def counts(self) -> tuple[int, int]:
        """(desired, running): running counts the service's RUNNING tasks."""

        async def read() -> tuple[int, int]:
            described = await self.client.describe_services(
                cluster=self.cluster, services=[self.service]
            )
            if not described['services']:
                raise TransportError(f'no ECS service {self.service} in cluster {self.cluster}')
            tasks = await self.client.list_tasks(
                cluster=self.cluster, serviceName=self.service, desiredStatus='RUNNING'
            )
            return described['services'][0]['desiredCount'], len(tasks['taskArns'])

        return await guarded_call(self.breaker, self.settings, 'ecs_counts', read)

    async def set_desired(self, desired: int) -> None:
        await guarded_call(
            self.breaker,
            self.settings,
            'ecs_update_service',
            lambda: self.client.update_service(
                cluster=self.cluster, service=self.service, desiredCount=desired
            ),
        )


async def observe(queue: SqsQueue, service: EcsService) -> Observation:
    depth = await queue.depth()
    desired, running = await service.counts()
    return Observation(
        at=time.time(),
        visible=depth.visible,
        in_flight=depth.in_flight,
        delayed=depth.delayed,
        desired=desired,
        running=running,
    )


async def scale_once(
    queue: SqsQueue,
    service: EcsService,
    store: Store,
    policy: ScalingPolicy,
    history: deque[Recommendation],
) -> Decision:
    """One poll: observe, decide, write the desired count if it changed, record the decision."""
    observation = await observe(queue, service)
    decision = decide(observation, list(history), policy)
    history.append(Recommendation(observation.at, decision.recommendation))
    while history and history[0].at <= observation.at - policy.scale_down_stabilisation_s:
        history.popleft()
    if decision.desired != observation.desired:
        await service.set_desired(decision.desired)
    event = {
        'cluster': service.cluster,
        'service': service.service,
        'visible': observation.visible,
        'in_flight': observation.in_flight,
        'delayed': observation.delayed,
        'running': observation.running,
        'desired_before': observation.desired,
        'recommendation': decision.recommendation,
        'desired': decision.desired,
        'reason': decision.reason,
    }
    await store.record_scaling_event(**event)
    log.info('scaled' if decision.desired != observation.desired else 'scaling_checked', **event)
    return decision


async def run_autoscaler(
    settings: Settings,
    policy: ScalingPolicy,
    cluster: str,
    service_name: str,
    poll_interval_s: float,
) -> None:
    """Poll until SIGTERM/SIGINT; a transient AWS or database error costs a poll, not the loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = Store.from_settings(settings)
    history: deque[Recommendation] = deque()
    try:
        await store.check_schema()
        async with open_queue(settings) as queue, ecs_client(settings) as client:
            service = EcsService(client, cluster, service_name, settings)
            log.info('autoscaler_started', service=service_name, **asdict(policy))
            while not stop.is_set():
                try:
                    await scale_once(queue, service, store, policy, history)
                except (TransportError, StoreUnavailable) as error:
                    log.warning('scaling_poll_failed', error=str(error))
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=poll_interval_s)
    finally:
        await store.close()
    log.info('autoscaler_stopped')
