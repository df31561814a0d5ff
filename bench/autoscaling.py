"""One burst through the auto-scaler and the local ECS agent: a timeline of depth, desired, running.

    .venv/bin/python bench/autoscaling.py [--burst 16] [--target 4] [--max-workers 4] [--json PATH]

Starts its own moto server and database, the auto-scaler and the ECS agent (workers with one slot
each, min 0), sends a burst of messages that the workers dead-letter (no Dagster run is needed to
drain a queue), and samples queue depth, desiredCount and running tasks until the service is back
at zero. Prints the delays from the burst to the first scale-up and to all workers running.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3

from dagster_taskiq import store
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import bootstrap_queues, open_queue
from dagster_taskiq.store import Store
from dagster_taskiq_demo.ecs_agent import bootstrap_ecs
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, start_moto
from dagster_taskiq_demo.stack import create_database, drop_database

SERVER_URL = os.environ.get('DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/postgres')
SAMPLE_S = 0.5
TIMEOUT_S = 300.0


async def send_burst(settings: Settings, count: int) -> float:
    async with open_queue(settings) as queue:
        sent_at = time.time()
        for index in range(count):
            await queue.send(f'burst message {index}', {})
    return sent_at


def sample(ecs: Any, sqs: Any, settings: Settings, queue_url: str) -> dict[str, Any]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=['ApproximateNumberOfMessages', 'ApproximateNumberOfMessagesNotVisible'],
    )['Attributes']
    service = ecs.describe_services(
        cluster=settings.ecs_cluster, services=[settings.worker_service]
    )['services'][0]
    tasks = ecs.list_tasks(
        cluster=settings.ecs_cluster, serviceName=settings.worker_service, desiredStatus='RUNNING'
    )['taskArns']
    return {
        'at': time.time(),
        'visible': int(attributes['ApproximateNumberOfMessages']),
        'in_flight': int(attributes['ApproximateNumberOfMessagesNotVisible']),
        'desired': service['desiredCount'],
        'running': len(tasks),
    }


def start(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open('wb') as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


def wait_logged(log_path: Path, event: str) -> None:
    deadline = time.monotonic() + 120
    while f'"event": "{event}"' not in log_path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f'{event} not in {log_path}')
        time.sleep(0.1)


def run(
    args: argparse.Namespace, scratch: Path, moto_url: str, database_url: str
) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:6]
    os.environ.update(
        {
            'DATABASE_URL': database_url,
            'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': moto_url,
            'DAGSTER_TASKIQ_QUEUE_NAME': f'burst-{suffix}',
            'DAGSTER_TASKIQ_ECS_CLUSTER': f'burst-{suffix}',
            'DAGSTER_TASKIQ_WORKER_SERVICE': f'workers-{suffix}',
        }
    )
    settings = Settings()
    urls = asyncio.run(bootstrap_queues(settings))
    ecs = boto3.client('ecs', endpoint_url=moto_url, region_name=settings.aws_region)
    sqs = boto3.client('sqs', endpoint_url=moto_url, region_name=settings.aws_region)
    bootstrap_ecs(ecs, settings.ecs_cluster, settings.worker_service)
    bin_dir = Path(sys.executable).parent
    agent = start(
        [str(bin_dir / 'dagster-taskiq-demo'), 'ecs-agent', '--poll-interval', '1',
         '--worker-concurrency', '1', '--data-dir', str(scratch)],
        scratch / 'agent.log',
    )  # fmt: skip
    scaler = start(
        [str(bin_dir / 'dagster-taskiq'), 'autoscaler', '--poll-interval', '1',
         '--min-workers', '0', '--max-workers', str(args.max_workers),
         '--target-backlog-per-worker', str(args.target), '--scale-down-stabilisation', '15'],
        scratch / 'autoscaler.log',
    )  # fmt: skip
    try:
        wait_logged(scratch / 'agent.log', 'ecs_agent_started')
        wait_logged(scratch / 'autoscaler.log', 'autoscaler_started')
        burst_at = asyncio.run(send_burst(settings, args.burst))
        samples = []
        peak = 0
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            row = sample(ecs, sqs, settings, urls.queue_url)
            samples.append(row)
            peak = max(peak, row['desired'])
            if peak and row['desired'] == 0 and row['running'] == 0:
                break
            time.sleep(SAMPLE_S)
    finally:
        for process in (scaler, agent):
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    events = asyncio.run(scaling_events(database_url, settings.worker_service))
    first_up = next(e for e in events if e['desired'] > e['desired_before'])
    all_running = next(s for s in samples if s['running'] >= peak)
    return {
        'burst': args.burst,
        'target_backlog_per_worker': args.target,
        'peak_desired': peak,
        'first_scale_up_s': round(first_up['at'].timestamp() - burst_at, 2),
        'all_running_s': round(all_running['at'] - burst_at, 2),
        'timeline': [{**s, 't_s': round(s['at'] - burst_at, 1)} for s in samples],
        'scaling_events': [
            {
                't_s': round(e['at'].timestamp() - burst_at, 1),
                **{k: e[k] for k in ('visible', 'in_flight', 'running', 'desired', 'reason')},
            }
            for e in events
            if e['desired'] != e['desired_before']
        ],
    }


async def scaling_events(database_url: str, service: str) -> list[Any]:
    db = Store.connect(database_url)
    try:
        return list(await db.list_scaling_events(service))
    finally:
        await db.close()


def print_report(report: dict[str, Any]) -> None:
    print(f'burst of {report["burst"]} messages, target {report["target_backlog_per_worker"]}')
    print(f'first scale-up after {report["first_scale_up_s"]} s; ', end='')
    print(f'all {report["peak_desired"]} workers running after {report["all_running_s"]} s')
    print(f'{"t s":>6} {"visible":>8} {"in flight":>9} {"desired":>8} {"running":>8}')
    last = None
    for row in report['timeline']:
        key = (row['visible'], row['in_flight'], row['desired'], row['running'])
        if key != last:
            print(f'{row["t_s"]:>6} {key[0]:>8} {key[1]:>9} {key[2]:>8} {key[3]:>8}')
            last = key
    print('decisions that changed desired:')
    for event in report['scaling_events']:
        print(f'  t={event["t_s"]:>6} s  desired {event["desired"]}: {event["reason"]}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--burst', type=int, default=16)
    parser.add_argument('--target', type=int, default=4)
    parser.add_argument('--max-workers', type=int, default=4)
    parser.add_argument('--json', type=Path)
    args = parser.parse_args()
    os.environ.update({k: os.environ.get(k, v) for k, v in EMULATOR_CREDENTIALS.items()})
    database = f'bench_{uuid.uuid4().hex[:10]}'
    moto = start_moto()
    try:
        database_url = create_database(SERVER_URL, database)
        store.upgrade(database_url)
        with tempfile.TemporaryDirectory(prefix='dagster-taskiq-burst-') as scratch:
            report = run(args, Path(scratch), moto.url, database_url)
    finally:
        drop_database(SERVER_URL, database)
        moto.stop()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == '__main__':
    main()
