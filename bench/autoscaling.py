"""One burst through the auto-scaler and the local ECS agent: a timeline of depth, desired, running.

    .venv/bin/python bench/autoscaling.py [--burst 16] [--target 4] [--max-workers 4] [--json PATH]

Starts the benchmarks' stack (harness.bench_stack: moto, a fresh database, the step queue), the
auto-scaler and the ECS agent (workers with one slot each, min 0), sends a burst of messages that
the workers dead-letter (no Dagster run is needed to drain a queue), and samples queue depth,
desiredCount and running tasks until the service is back at zero. Prints the delays from the
burst to the first scale-up and to all workers running.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from harness import BenchStack, bench_stack, write_json

from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import open_queue
from dagster_taskiq.store import Store
from dagster_taskiq_demo.ecs_agent import bootstrap_ecs
from dagster_taskiq_demo.stack import stop_process, wait_for

SAMPLE_S = 0.5
STOP_TIMEOUT_S = 120.0
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
    # No DAGSTER_HOME (no Dagster run here): with it, each worker's forkserver would build the
    # Dagster instance as it starts (and the first would create Dagster's tables), which the
    # burst's start-up delays did not include
    env = {key: value for key, value in os.environ.items() if key != 'DAGSTER_HOME'}
    with log_path.open('wb') as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def wait_logged(log_path: Path, event: str) -> None:
    wait_for(lambda: f'"event": "{event}"' in log_path.read_text(), 120, f'{event} in {log_path}')


def run(args: argparse.Namespace, stack: BenchStack) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:6]
    os.environ.update(
        {
            'DAGSTER_TASKIQ_ECS_CLUSTER': f'burst-{suffix}',
            'DAGSTER_TASKIQ_WORKER_SERVICE': f'workers-{suffix}',
        }
    )
    settings = Settings()  # the step queue is bench_stack's, already bootstrapped
    ecs = boto3.client('ecs', endpoint_url=stack.moto_url, region_name=settings.aws_region)
    sqs = boto3.client('sqs', endpoint_url=stack.moto_url, region_name=settings.aws_region)
    queue_url = sqs.get_queue_url(QueueName=settings.queue_name)['QueueUrl']
    bootstrap_ecs(ecs, settings.ecs_cluster, settings.worker_service)
    scratch = stack.scratch
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
            row = sample(ecs, sqs, settings, queue_url)
            samples.append(row)
            peak = max(peak, row['desired'])
            if peak and row['desired'] == 0 and row['running'] == 0:
                break
            time.sleep(SAMPLE_S)
    finally:
        for process in (scaler, agent):
            stop_process(process, STOP_TIMEOUT_S)
    events = asyncio.run(scaling_events(stack.database_url, settings.worker_service))
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
    with bench_stack() as stack:
        report = run(args, stack)
    print_report(report)
    if args.json:
        write_json(args.json, report)


if __name__ == '__main__':
    main()
