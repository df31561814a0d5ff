"""The auto-scaler against the moto server: queue depth in, ECS desiredCount out, local workers."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from dagster_taskiq import store
from dagster_taskiq.autoscaler import (
    EcsService,
    Recommendation,
    ScalingPolicy,
    ecs_client,
    scale_once,
)
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues, open_queue
from dagster_taskiq.store import Store
from dagster_taskiq_demo.ecs_agent import bootstrap_ecs
from dagster_taskiq_demo.emulator import start_moto
from tests.conftest import migrate
from tests.logs import events
from tests.waiting import eventually

BURST = 12
TARGET = 4


@pytest.fixture
def scaling_settings(settings: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={'ecs_cluster': f'cluster-{suffix}', 'worker_service': f'workers-{suffix}'}
    )


def ecs(settings: Settings) -> Any:
    return boto3.client('ecs', endpoint_url=settings.aws_endpoint_url, region_name='us-east-1')


async def test_one_poll_scales_a_burst_and_records_the_decision(
    scaling_settings: Settings, db: Store
) -> None:
    settings = scaling_settings
    await bootstrap_queues(settings)
    bootstrap_ecs(ecs(settings), settings.ecs_cluster, settings.worker_service)
    policy = ScalingPolicy(max_workers=2, target_backlog_per_worker=TARGET)
    async with open_queue(settings) as queue, ecs_client(settings) as client:
        for index in range(BURST):
            await queue.send(f'burst {index}', {})
        service = EcsService(client, settings.ecs_cluster, settings.worker_service, settings)
        history: deque[Recommendation] = deque()
        decision = await scale_once(queue, service, db, policy, history)
        assert (decision.desired, decision.recommendation) == (2, 2)  # ceil(12 / 4) = 3, capped
        assert (await service.counts())[0] == 2
        again = await scale_once(queue, service, db, policy, history)
        assert again.desired == 2
    decisions = await db.list_scaling_events(settings.worker_service)
    assert [(e['visible'], e['desired_before'], e['desired']) for e in decisions] == [
        (BURST, 0, 2),
        (BURST, 2, 2),
    ]
    assert decisions[0]['reason'].startswith('scale up')


async def logged(path: Path, event: str) -> bool:
    return bool(events(path, event))


def running_tasks(settings: Settings) -> int:
    listed = ecs(settings).list_tasks(
        cluster=settings.ecs_cluster, serviceName=settings.worker_service, desiredStatus='RUNNING'
    )
    return len(listed['taskArns'])


@pytest.fixture
def services(
    scaling_settings: Settings, database_url: str, tmp_path: Path
) -> Iterator[tuple[Settings, Path, dict[str, subprocess.Popen[bytes]]]]:
    """The auto-scaler and the local ECS agent as processes of their own; stopped afterwards."""
    settings = scaling_settings
    migrate(database_url)  # the workers need Dagster's tables beside the store's
    asyncio.run(bootstrap_queues(settings))
    bootstrap_ecs(ecs(settings), settings.ecs_cluster, settings.worker_service)
    home = tmp_path / 'dagster_home'  # the workers' Dagster instance (they run no step here)
    home.mkdir()
    (home / 'dagster.yaml').write_text('telemetry:\n  enabled: false\n')
    env = {
        **os.environ,
        'DAGSTER_HOME': str(home),
        'DAGSTER_TASKIQ_SIGNING_KEY': 'autoscaling-test-key',
        'DATABASE_URL': database_url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': str(settings.aws_endpoint_url),
        'DAGSTER_TASKIQ_QUEUE_NAME': settings.queue_name,
        'DAGSTER_TASKIQ_ECS_CLUSTER': settings.ecs_cluster,
        'DAGSTER_TASKIQ_WORKER_SERVICE': settings.worker_service,
    }
    bin_dir = Path(sys.executable).parent
    commands = {
        'agent': [str(bin_dir / 'dagster-taskiq-demo'), 'ecs-agent', '--poll-interval', '0.5',
                  '--data-dir', str(tmp_path), '--worker-concurrency', '1'],
        'autoscaler': [str(bin_dir / 'dagster-taskiq'), 'autoscaler', '--poll-interval', '0.5',
                       '--min-workers', '0', '--max-workers', '3', '--target-backlog-per-worker',
                       str(TARGET), '--scale-down-stabilisation', '5'],
    }  # fmt: skip
    processes = {}
    for name, command in commands.items():
        with (tmp_path / f'{name}.log').open('wb') as log_file:
            processes[name] = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
    try:
        for name, started in (('agent', 'ecs_agent_started'), ('autoscaler', 'autoscaler_started')):
            asyncio.run(
                eventually(
                    lambda n=name, s=started: logged(tmp_path / f'{n}.log', s),
                    timeout_s=60,
                    what=f'{name} to start',
                )
            )
        yield settings, tmp_path, processes
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            assert process.wait(90) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_burst_brings_up_workers_that_drain_and_scale_back(
    services: tuple[Settings, Path, dict[str, subprocess.Popen[bytes]]], db: Store
) -> None:
    settings, logs, processes = services

    async def agent_events(event: str) -> list[dict[str, Any]]:
        return events(logs / 'agent.log', event)

    async with open_queue(settings) as queue:
        for index in range(BURST):
            await queue.send(f'not a step message {index}', {})

    async def scaled_up() -> bool:
        decisions = await db.list_scaling_events(settings.worker_service)
        return any(e['desired'] == 3 for e in decisions)

    await eventually(scaled_up, timeout_s=30, what='desired 3')
    decisions = await db.list_scaling_events(settings.worker_service)
    # Up in one step to what the poll saw (the burst's sends are slow, and a first worker may
    # already drain it, so no poll need see all 12): 3 = ceil(backlog / 4) for a backlog of 9-12.
    first_three = next(e for e in decisions if e['desired'] == 3)
    assert first_three['visible'] + first_three['in_flight'] > 2 * TARGET

    async def three_started() -> bool:  # the workers drain the burst (to the DLQ) as they come up
        return len(await agent_events('task_started')) == 3

    await eventually(three_started, timeout_s=120, what='three workers serving')

    async def drained_and_scaled_to_zero() -> bool:
        stopped = await agent_events('task_stopped')
        return (
            await queue_depth(settings) == 0 and len(stopped) == 3 and running_tasks(settings) == 0
        )

    await eventually(drained_and_scaled_to_zero, timeout_s=120, what='scale back to zero')
    assert {e['exit_code'] for e in await agent_events('task_stopped')} == {0}  # drained, exit 0

    # The agent replaces a worker that dies: hold the service at one without the auto-scaler.
    processes['autoscaler'].send_signal(signal.SIGTERM)
    assert processes['autoscaler'].wait(60) == 0
    ecs(settings).update_service(
        cluster=settings.ecs_cluster, service=settings.worker_service, desiredCount=1
    )

    async def fourth_serving() -> bool:
        return len(await agent_events('task_started')) == 4 and running_tasks(settings) == 1

    await eventually(fourth_serving, timeout_s=120, what='one worker serving')
    victim = (await agent_events('task_started'))[-1]
    os.kill(victim['pid'], signal.SIGKILL)

    async def replaced() -> bool:
        return (
            len(await agent_events('task_exited_unexpectedly')) == 1
            and len(await agent_events('task_started')) == 5
            and running_tasks(settings) == 1
        )

    await eventually(replaced, timeout_s=120, what='the killed worker replaced')


async def queue_depth(settings: Settings) -> int:
    async with open_queue(settings) as queue:
        depth = await queue.depth()
    return depth.visible + depth.in_flight


def start_autoscaler(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).with_name('dagster-taskiq')), 'autoscaler']
    with log_path.open('wb') as log_file:
        return subprocess.Popen(
            [*command, '--poll-interval', '0.2'],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.mark.slow
async def test_the_loop_survives_an_unreachable_endpoint(
    scaling_settings: Settings, database_url: str, tmp_path: Path
) -> None:
    own_moto = start_moto()
    settings = scaling_settings.model_copy(update={'aws_endpoint_url': own_moto.url})
    store.upgrade(database_url)
    await bootstrap_queues(settings)
    bootstrap_ecs(ecs(settings), settings.ecs_cluster, settings.worker_service)
    env = {
        **os.environ,
        'DATABASE_URL': database_url,
        'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': own_moto.url,
        'DAGSTER_TASKIQ_QUEUE_NAME': settings.queue_name,
        'DAGSTER_TASKIQ_ECS_CLUSTER': settings.ecs_cluster,
        'DAGSTER_TASKIQ_WORKER_SERVICE': settings.worker_service,
        'DAGSTER_TASKIQ_RETRY_BASE_S': '0.05',
        'DAGSTER_TASKIQ_RETRY_MAX_S': '0.1',
    }
    log_path = tmp_path / 'autoscaler.log'
    scaler = start_autoscaler(env, log_path)
    try:

        async def polls(event: str, at_least: int) -> bool:
            return len(events(log_path, event)) >= at_least

        await eventually(lambda: polls('scaling_checked', 1), timeout_s=60, what='a poll')
        own_moto.stop()
        await eventually(lambda: polls('scaling_poll_failed', 3), timeout_s=60, what='failed polls')
        assert scaler.poll() is None  # still looping
        restarted = start_moto(own_moto.port)
        try:
            await bootstrap_queues(settings)  # the emulator came back empty
            bootstrap_ecs(ecs(settings), settings.ecs_cluster, settings.worker_service)
            checked = len(events(log_path, 'scaling_checked'))
            await eventually(
                lambda: polls('scaling_checked', checked + 1), timeout_s=60, what='recovery'
            )
        finally:
            scaler.send_signal(signal.SIGTERM)
            assert scaler.wait(60) == 0
            restarted.stop()
    finally:
        if scaler.poll() is None:
            scaler.kill()
        own_moto.stop()
