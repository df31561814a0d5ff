"""The seed's operations tasks as functions returning plain data (the CLI prints a table or JSON).

They find the stack's resources in `<data dir>/stack.json` (written by `up`); without it, in the
environment (`DAGSTER_TASKIQ_*`, `AWS_*`), so the same commands work against real AWS when no
endpoint is set.
"""

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import psycopg
from psycopg.rows import dict_row

from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import retry_queue_name
from dagster_taskiq_demo.cloudwatch import log_group
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS
from dagster_taskiq_demo.local_stack import STACK_FILE

_DURATION = re.compile(r'^(\d+)([smhd])$')
_UNIT_S = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
RECENT_DECISIONS = 10


@dataclass(frozen=True)
class Target:
    env: str
    aws_endpoint_url: str | None
    ecs_endpoint_url: str | None
    aws_region: str
    queue_name: str
    ecs_cluster: str
    worker_service: str
    database_url: str

    def client(self, service: str) -> Any:
        credentials: dict[str, str] = {}
        if self.aws_endpoint_url and not os.environ.get('AWS_ACCESS_KEY_ID'):
            credentials = {  # the emulator takes any credentials; boto wants some
                'aws_access_key_id': EMULATOR_CREDENTIALS['AWS_ACCESS_KEY_ID'],
                'aws_secret_access_key': EMULATOR_CREDENTIALS['AWS_SECRET_ACCESS_KEY'],
            }
        endpoint = self.ecs_endpoint_url if service == 'ecs' else self.aws_endpoint_url
        return boto3.client(
            service, endpoint_url=endpoint, region_name=self.aws_region, **credentials
        )


def read_stack(data_dir: Path) -> dict[str, Any] | None:
    """What the stack of `data_dir` wrote about itself (its stack.json), if one was started."""
    path = data_dir / STACK_FILE
    described: dict[str, Any] | None = json.loads(path.read_text()) if path.exists() else None
    return described


def find_target(data_dir: Path, env_name: str) -> Target:
    """The running stack's resources (its stack.json), else those the environment names."""
    described = read_stack(data_dir)
    if described is not None:
        return Target(
            env=described['env'],
            aws_endpoint_url=described['aws_endpoint_url'],
            ecs_endpoint_url=described['ecs_endpoint_url'],
            aws_region=described['aws_region'],
            queue_name=described['queue_name'],
            ecs_cluster=described['ecs_cluster'],
            worker_service=described['worker_service'],
            database_url=described['database_url'],
        )
    settings = Settings()
    return Target(
        env=env_name,
        aws_endpoint_url=settings.aws_endpoint_url,
        ecs_endpoint_url=settings.ecs_endpoint,
        aws_region=settings.aws_region,
        queue_name=settings.queue_name,
        ecs_cluster=settings.ecs_cluster,
        worker_service=settings.worker_service,
        database_url=settings.database_url,
    )


def parse_since(text: str) -> float:
    """'30s', '5m', '2h', '1d' in seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f'{text!r} is not a duration like 30s, 5m, 2h or 1d')
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def queue_depth(target: Target) -> list[dict[str, Any]]:
    """Visible, in-flight and delayed messages of the step queue, the retry queue and the DLQ."""
    sqs = target.client('sqs')
    rows = []
    for role, name in (
        ('steps', target.queue_name),
        ('retries', retry_queue_name(target.queue_name)),
        ('dead letters', f'{target.queue_name}-dlq'),
    ):
        url = sqs.get_queue_url(QueueName=name)['QueueUrl']
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=['All'])['Attributes']
        rows.append(
            {
                'queue': role,
                'name': name,
                'visible': int(attributes.get('ApproximateNumberOfMessages', 0)),
                'in_flight': int(attributes.get('ApproximateNumberOfMessagesNotVisible', 0)),
                'delayed': int(attributes.get('ApproximateNumberOfMessagesDelayed', 0)),
            }
        )
    return rows


def dead_letters(target: Target, redrive: bool = False) -> list[dict[str, Any]]:
    """The DLQ's messages with their reasons; `redrive` sends each back to the step queue."""
    sqs = target.client('sqs')
    dlq_url = sqs.get_queue_url(QueueName=f'{target.queue_name}-dlq')['QueueUrl']
    queue_url = sqs.get_queue_url(QueueName=target.queue_name)['QueueUrl']
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    while True:
        response = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0 if not redrive else 30,
            MessageAttributeNames=['All'],
            AttributeNames=['SentTimestamp', 'ApproximateReceiveCount'],
        )
        messages = [m for m in response.get('Messages', []) if m['MessageId'] not in seen]
        if not messages:
            return found
        for item in messages:
            seen.add(item['MessageId'])
            attributes = {
                name: value.get('StringValue', '')
                for name, value in item.get('MessageAttributes', {}).items()
            }
            found.append(
                {
                    'message_id': item['MessageId'],
                    'reason': attributes.pop(
                        'reason', '(none: redriven by SQS after too many receives)'
                    ),
                    'attributes': attributes,
                    'sent_at': int(item['Attributes'].get('SentTimestamp', 0)) / 1000,
                    'body': item['Body'][:200],
                }
            )
            if redrive:
                sqs.send_message(QueueUrl=queue_url, MessageBody=item['Body'])
                sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=item['ReceiptHandle'])


def _running_tasks(ecs: Any, cluster: str, service: str) -> list[str]:
    arns: list[str] = ecs.list_tasks(
        cluster=cluster, startedBy=f'ecs-svc/{service}'[:36], desiredStatus='RUNNING'
    )['taskArns']
    if not arns:  # on AWS, a service's tasks are listed by service name
        arns = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus='RUNNING')[
            'taskArns'
        ]
    return arns


def ecs_status(target: Target, service: str | None = None) -> dict[str, Any]:
    """A service's desired and running counts, and the auto-scaler's recent decisions."""
    service = service or target.worker_service
    ecs = target.client('ecs')
    [described] = ecs.describe_services(cluster=target.ecs_cluster, services=[service])['services']
    running = len(_running_tasks(ecs, target.ecs_cluster, service))
    with psycopg.connect(target.database_url, row_factory=dict_row) as connection:
        decisions = connection.execute(
            'SELECT at, visible, in_flight, desired_before, recommendation, desired, reason'
            ' FROM scaling_events WHERE service = %s AND cluster = %s ORDER BY at DESC LIMIT %s',
            (service, target.ecs_cluster, RECENT_DECISIONS),
        ).fetchall()
    return {
        'cluster': target.ecs_cluster,
        'service': service,
        'status': described.get('status'),
        'desired': described['desiredCount'],
        'running': running,
        'recent_decisions': [{**d, 'at': d['at'].isoformat()} for d in decisions],
    }


def services(target: Target) -> list[dict[str, Any]]:
    ecs = target.client('ecs')
    arns = ecs.list_services(cluster=target.ecs_cluster)['serviceArns']
    if not arns:
        return []
    described = ecs.describe_services(cluster=target.ecs_cluster, services=arns)['services']
    return [
        {
            'service': s['serviceName'],
            'status': s.get('status'),
            'desired': s['desiredCount'],
            'running': len(_running_tasks(ecs, target.ecs_cluster, s['serviceName'])),
            'task_definition': s.get('taskDefinition', '').rsplit('/', 1)[-1],
        }
        for s in described
    ]


def tasks(target: Target) -> list[dict[str, Any]]:
    ecs = target.client('ecs')
    arns = ecs.list_tasks(cluster=target.ecs_cluster, desiredStatus='RUNNING')['taskArns']
    if not arns:
        return []
    described = ecs.describe_tasks(cluster=target.ecs_cluster, tasks=arns)['tasks']
    return [
        {
            'task': t['taskArn'].rsplit('/', 1)[-1],
            'status': t.get('lastStatus'),
            'started_by': t.get('startedBy', ''),
            'started_at': str(t.get('startedAt', '')),
            'task_definition': t.get('taskDefinitionArn', '').rsplit('/', 1)[-1],
        }
        for t in described
    ]


def log_events(
    target: Target, service: str, since_s: float, after: set[str] | None = None
) -> list[dict[str, Any]]:
    """The service's log events of the last `since_s` seconds, oldest first."""
    from dagster_taskiq_demo.cloudwatch import read_events

    since_ms = int((time.time() - since_s) * 1000)
    events = read_events(target.client('logs'), log_group(service, target.env), since_ms, after)
    return [
        {
            'event_id': e['eventId'],
            'timestamp': e['timestamp'] / 1000,
            'stream': e['logStreamName'],
            'message': e['message'],
        }
        for e in events
    ]
