"""Least-privilege IAM: every statement names its resources, except the two actions AWS cannot
scope (explained where they are written); no action is a wildcard."""

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_aws as aws
from deploy_config import PROJECT, DeployConfig
from storage import OUTPUTS_PREFIX, Journal, Queues, Secrets

SQS_CONSUME = [
    'sqs:ChangeMessageVisibility',
    'sqs:DeleteMessage',
    'sqs:GetQueueAttributes',
    'sqs:ReceiveMessage',
]
LOG_WRITE = ['logs:CreateLogStream', 'logs:PutLogEvents']
Statement = dict[str, Any]


def allow(
    actions: Sequence[str],
    resources: Sequence[pulumi.Input[str]],
    condition: Mapping[str, Any] | None = None,
) -> Statement:
    statement = {'Effect': 'Allow', 'Action': sorted(actions), 'Resource': list(resources)}
    return {**statement, 'Condition': condition} if condition else statement


def log_streams(group: aws.cloudwatch.LogGroup) -> pulumi.Output[str]:
    """The streams of one log group (the awslogs driver names them after the task's id)."""
    return pulumi.Output.concat(group.arn, ':*')


def role(config: DeployConfig, name: str, statements: list[Statement]) -> aws.iam.Role:
    account = aws.get_caller_identity_output().account_id
    trust = pulumi.Output.json_dumps(
        {
            'Version': '2012-10-17',
            'Statement': [
                {
                    'Effect': 'Allow',
                    'Principal': {'Service': 'ecs-tasks.amazonaws.com'},
                    'Action': 'sts:AssumeRole',
                    'Condition': {'StringEquals': {'aws:SourceAccount': account}},
                }
            ],
        }
    )
    created = aws.iam.Role(name, name=f'{PROJECT}-{config.env}-{name}', assume_role_policy=trust)
    aws.iam.RolePolicy(
        name,
        role=created.id,
        policy=pulumi.Output.json_dumps({'Version': '2012-10-17', 'Statement': statements}),
    )
    return created


def execution_statements(
    repository: aws.ecr.Repository,
    log_groups: Mapping[str, aws.cloudwatch.LogGroup],
    secrets: Secrets,
) -> list[Statement]:
    """What ECS needs to start the tasks: the image, the log groups and the two secrets."""
    return [
        allow(
            ['ecr:BatchCheckLayerAvailability', 'ecr:BatchGetImage', 'ecr:GetDownloadUrlForLayer'],
            [repository.arn],
        ),
        # Exception 1 of 2: GetAuthorizationToken has no resource type (AWS requires "*"), and
        # no private ECR image is pulled without the token. The token alone reads nothing: every
        # image read is the statement above, on this repository only.
        allow(['ecr:GetAuthorizationToken'], ['*']),
        allow(LOG_WRITE, [log_streams(group) for group in log_groups.values()]),
        allow(['secretsmanager:GetSecretValue'], [secrets.database.arn, secrets.signing_key.arn]),
    ]


def run_worker_statements(queues: Queues) -> list[Statement]:
    """The executor: sends steps (retries to both work queues), reads their depth; resolving the
    queues' URLs includes the DLQ's (from the step queue's RedrivePolicy)."""
    work = [queues.step.arn, queues.retry.arn]
    return [
        allow(['sqs:GetQueueAttributes', 'sqs:SendMessage'], work),
        allow(['sqs:GetQueueUrl'], queues.arns),
    ]


def outputs_statements(bucket: aws.s3.Bucket) -> list[Statement]:
    """Dagster's S3 IO manager (dagster_aws.s3.io_manager.PickledObjectS3IOManager) on its prefix:
    list_objects once when it starts (Prefix 'demo', MaxKeys 1), get_object to load an input,
    upload_fileobj (PutObject, multipart above 8 MB) to store an output. Op outputs are never
    deleted (only a partitioned asset's would be; the demo has none): no s3:DeleteObject, the
    lifecycle rule expires them."""
    return [
        allow(
            ['s3:GetObject', 's3:PutObject'],
            [pulumi.Output.concat(bucket.arn, f'/{OUTPUTS_PREFIX}/*')],
        ),
        # 'demo' itself: the start-up listing's Prefix has no slash, and is refused without it
        allow(
            ['s3:ListBucket'],
            [bucket.arn],
            {'StringLike': {'s3:prefix': [OUTPUTS_PREFIX, f'{OUTPUTS_PREFIX}/*']}},
        ),
    ]


def worker_statements(
    queues: Queues, log_group: aws.cloudwatch.LogGroup, journal: Journal, outputs: aws.s3.Bucket
) -> list[Statement]:
    work = [queues.step.arn, queues.retry.arn]
    return [
        allow(SQS_CONSUME, work),
        allow(['sqs:SendMessage'], queues.arns),  # dead letters, and a retry to both queues
        allow(['sqs:GetQueueUrl'], queues.arns),
        allow(LOG_WRITE, [log_streams(log_group)]),
        allow(
            ['elasticfilesystem:ClientMount', 'elasticfilesystem:ClientWrite'],
            [journal.file_system.arn],
            {'StringEquals': {'elasticfilesystem:AccessPointArn': journal.access_point.arn}},
        ),
        *outputs_statements(outputs),
    ]


def autoscaler_statements(
    queues: Queues, cluster: aws.ecs.Cluster, worker: aws.ecs.Service
) -> list[Statement]:
    return [
        allow(['sqs:GetQueueAttributes'], [queues.step.arn, queues.retry.arn]),
        allow(['sqs:GetQueueUrl'], queues.arns),
        allow(['ecs:DescribeServices', 'ecs:UpdateService'], [worker.arn]),
        # Exception 2 of 2: ListTasks' only resource type is the container instance (Fargate
        # tasks have none), so no cluster or service ARN scopes it; the ecs:cluster condition
        # holds the "*" to this cluster. The scaler counts RUNNING tasks with it.
        allow(['ecs:ListTasks'], ['*'], {'ArnEquals': {'ecs:cluster': cluster.arn}}),
    ]
