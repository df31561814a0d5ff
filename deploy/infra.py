"""dagster-taskiq on AWS: SQS queues, four ECS Fargate services from one image, RDS PostgreSQL,
the workers' journal on EFS, the steps' outputs on S3, CloudWatch log groups and least-privilege
IAM.

`build(config)` creates everything; `__main__.py` exports its outputs and the tests call it under
Pulumi's mocks.
"""

from dataclasses import dataclass
from typing import Any

import iam
import pulumi
import pulumi_aws as aws
import storage
from deploy_config import PROJECT, DeployConfig
from network import (
    WEBSERVER_PORT,
    Entry,
    Network,
    SecurityGroups,
    load_balancer,
    network,
    security_groups,
)
from storage import Journal, Queues, Secrets

# ECS service name -> the image entry point's argument
WEBSERVER, DAEMON, WORKER, AUTOSCALER = SERVICES = (
    'dagster-webserver',
    'dagster-daemon',
    'taskiq-worker',
    'auto-scaler',
)
COMMANDS = {WEBSERVER: 'webserver', DAEMON: 'daemon', WORKER: 'worker', AUTOSCALER: 'autoscaler'}
ECR_REPOSITORY = 'dagster-taskiq'
METRICS_PORT = 9090
JOURNAL_DIR = '/var/lib/dagster-taskiq/journal'
JOURNAL_VOLUME = 'journal'
# The worker drains for 30 s after SIGTERM, then releases what still runs; Fargate allows 120 s
WORKER_STOP_TIMEOUT_S = 120
# python:3.13-slim has no curl
WORKER_HEALTH_CHECK = [
    'CMD',
    'python',
    '-c',
    'import urllib.request,sys; '
    f"urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/healthz', timeout=3)",
]


@dataclass(frozen=True)
class Infra:
    queues: Queues
    cluster: aws.ecs.Cluster
    log_groups: dict[str, aws.cloudwatch.LogGroup]
    task_definitions: dict[str, aws.ecs.TaskDefinition]
    services: dict[str, aws.ecs.Service]
    outputs: dict[str, pulumi.Output[Any]]


def build(config: DeployConfig) -> Infra:
    net = network(config)
    groups = security_groups(config, net)
    queues = storage.queues(config)
    cluster = aws.ecs.Cluster('cluster', name=config.cluster_name)
    repository = aws.ecr.Repository(
        'repository',
        name=ECR_REPOSITORY,
        image_scanning_configuration={'scan_on_push': True},
        force_delete=not config.protect_data,
    )
    log_groups = {
        service: aws.cloudwatch.LogGroup(
            service,
            name=f'/aws/ecs/{service}-{config.env}',
            retention_in_days=config.log_retention_days,
        )
        for service in SERVICES
    }
    secrets = storage.secrets(config, net, groups)
    journal = storage.journal(config, net, groups)
    outputs_bucket = storage.outputs_bucket(config)
    entry = load_balancer(config, net, groups)
    image = pulumi.Output.concat(repository.repository_url, ':', config.image_tag)
    execution_role = iam.role(
        config, 'execution', iam.execution_statements(repository, log_groups, secrets)
    )
    task_definitions: dict[str, aws.ecs.TaskDefinition] = {}
    services: dict[str, aws.ecs.Service] = {}
    run_worker = iam.run_worker_statements(queues)  # Dagster's run workers run inside the daemon
    task_statements = {
        WEBSERVER: run_worker,
        DAEMON: run_worker,
        WORKER: iam.worker_statements(queues, log_groups[WORKER], journal, outputs_bucket),
    }
    for service in SERVICES:
        if service == AUTOSCALER:  # its role names the worker service, created before it
            task_statements[service] = iam.autoscaler_statements(queues, cluster, services[WORKER])
        task_role = iam.role(config, service, task_statements[service])
        task_definitions[service] = _task_definition(
            config,
            service,
            image,
            outputs_bucket.bucket,
            log_groups[service],
            secrets,
            execution_role,
            task_role,
            journal if service == WORKER else None,
        )
        depends_on: list[pulumi.Resource] = [*secrets.versions]
        if service == WORKER:
            depends_on += journal.mount_targets
        if service == WEBSERVER:
            depends_on.append(entry.listener)
        services[service] = _service(
            config,
            service,
            cluster,
            task_definitions[service],
            net,
            groups,
            depends_on,
            entry if service == WEBSERVER else None,
        )
    outputs = {
        'queueUrl': queues.step.url,
        'retryQueueUrl': queues.retry.url,
        'dlqUrl': queues.dlq.url,
        'clusterName': cluster.name,
        'ecrRepositoryUrl': repository.repository_url,
        'webserverUrl': pulumi.Output.concat('http://', entry.load_balancer.dns_name),
        'databaseSecretArn': secrets.database.arn,
        'signingKeySecretArn': secrets.signing_key.arn,
        'logGroups': pulumi.Output.from_input({s: g.name for s, g in log_groups.items()}),
        'outputsBucket': outputs_bucket.bucket,
    }
    return Infra(queues, cluster, log_groups, task_definitions, services, outputs)


def _environment(
    config: DeployConfig, service: str, outputs_bucket: pulumi.Output[str]
) -> dict[str, pulumi.Input[str]]:
    """The project's settings (dagster_taskiq.settings and the CLI's DAGSTER_TASKIQ_* options)."""
    environment: dict[str, pulumi.Input[str]] = {
        'DAGSTER_TASKIQ_QUEUE_NAME': config.queue_name,
        'DAGSTER_TASKIQ_AWS_REGION': config.region,
        'DAGSTER_TASKIQ_ECS_CLUSTER': config.cluster_name,
        'DAGSTER_TASKIQ_WORKER_SERVICE': WORKER,
    }
    if service != AUTOSCALER:  # the code location's IO manager (the worker runs the steps)
        environment['DAGSTER_TASKIQ_DEMO_S3_BUCKET'] = outputs_bucket
    if service == WORKER:
        environment |= {
            'DAGSTER_TASKIQ_CONCURRENCY': str(config.worker_concurrency),
            'DAGSTER_TASKIQ_METRICS_PORT': str(METRICS_PORT),
            'DAGSTER_TASKIQ_JOURNAL_DIR': JOURNAL_DIR,
        }
    if service == AUTOSCALER:
        environment |= {
            'DAGSTER_TASKIQ_MIN_WORKERS': str(config.min_workers),
            'DAGSTER_TASKIQ_MAX_WORKERS': str(config.max_workers),
            'DAGSTER_TASKIQ_TARGET_BACKLOG_PER_WORKER': str(config.target_backlog_per_worker),
        }
    return environment


def _container_secrets(service: str, secrets: Secrets) -> dict[str, pulumi.Output[str]]:
    """Secrets reach containers only as ECS `secrets`, read by the execution role at start."""
    values = {'DATABASE_URL': pulumi.Output.concat(secrets.database.arn, ':url::')}
    if service != AUTOSCALER:
        values['DAGSTER_TASKIQ_SIGNING_KEY'] = secrets.signing_key.arn
    return values


def _role_specifics(service: str) -> dict[str, Any]:
    if service == WEBSERVER:
        return {'portMappings': [{'containerPort': WEBSERVER_PORT, 'protocol': 'tcp'}]}
    if service == WORKER:
        return {
            'portMappings': [{'containerPort': METRICS_PORT, 'protocol': 'tcp'}],
            'healthCheck': {
                'command': WORKER_HEALTH_CHECK,
                'interval': 30,
                'timeout': 5,
                'retries': 3,
                'startPeriod': 60,
            },
            'stopTimeout': WORKER_STOP_TIMEOUT_S,
            'mountPoints': [
                {'sourceVolume': JOURNAL_VOLUME, 'containerPath': JOURNAL_DIR, 'readOnly': False}
            ],
        }
    return {}


def _task_definition(
    config: DeployConfig,
    service: str,
    image: pulumi.Output[str],
    outputs_bucket: pulumi.Output[str],
    log_group: aws.cloudwatch.LogGroup,
    secrets: Secrets,
    execution_role: aws.iam.Role,
    task_role: aws.iam.Role,
    journal: Journal | None = None,
) -> aws.ecs.TaskDefinition:
    container = {
        'name': service,
        'image': image,
        'essential': True,
        'command': [COMMANDS[service]],
        'environment': [
            {'name': name, 'value': value}
            for name, value in sorted(_environment(config, service, outputs_bucket).items())
        ],
        'secrets': [
            {'name': name, 'valueFrom': value}
            for name, value in sorted(_container_secrets(service, secrets).items())
        ],
        'logConfiguration': {
            'logDriver': 'awslogs',
            'options': {
                'awslogs-group': log_group.name,
                'awslogs-region': config.region,
                'awslogs-stream-prefix': COMMANDS[service],
            },
        },
        **_role_specifics(service),
    }
    size = config.worker_size if service == WORKER else config.service_size
    volumes: list[aws.ecs.TaskDefinitionVolumeArgsDict] = []
    if journal is not None:
        volumes.append(
            {
                'name': JOURNAL_VOLUME,
                'efs_volume_configuration': {
                    'file_system_id': journal.file_system.id,
                    'transit_encryption': 'ENABLED',
                    'authorization_config': {
                        'access_point_id': journal.access_point.id,
                        'iam': 'ENABLED',  # mounts as the worker's task role
                    },
                },
            }
        )
    return aws.ecs.TaskDefinition(
        service,
        family=f'{PROJECT}-{config.env}-{service}',
        cpu=str(size.cpu),
        memory=str(size.memory_mib),
        network_mode='awsvpc',
        requires_compatibilities=['FARGATE'],
        runtime_platform={'operating_system_family': 'LINUX', 'cpu_architecture': 'X86_64'},
        execution_role_arn=execution_role.arn,
        task_role_arn=task_role.arn,
        container_definitions=pulumi.Output.json_dumps([container]),
        volumes=volumes,
    )


def _service(
    config: DeployConfig,
    service: str,
    cluster: aws.ecs.Cluster,
    task_definition: aws.ecs.TaskDefinition,
    net: Network,
    groups: SecurityGroups,
    depends_on: list[pulumi.Resource],
    entry: Entry | None = None,
) -> aws.ecs.Service:
    worker = service == WORKER
    singleton = service in (DAEMON, AUTOSCALER)  # two Dagster daemons or scalers must not overlap
    load_balancers: list[aws.ecs.ServiceLoadBalancerArgsDict] = []
    if entry is not None:
        load_balancers.append(
            {
                'target_group_arn': entry.target_group.arn,
                'container_name': service,
                'container_port': WEBSERVER_PORT,
            }
        )
    return aws.ecs.Service(
        service,
        name=service,
        cluster=cluster.arn,
        task_definition=task_definition.arn,
        launch_type='FARGATE',
        # The auto-scaler owns the worker count: it starts at 0 and no deploy resets it
        desired_count=0 if worker else 1,
        deployment_minimum_healthy_percent=0 if singleton else 100,
        deployment_maximum_percent=100 if singleton else 200,
        deployment_circuit_breaker={'enable': True, 'rollback': True},
        network_configuration={
            'subnets': net.private_subnet_ids,
            'security_groups': [groups.services.id],
            'assign_public_ip': False,
        },
        load_balancers=load_balancers,
        health_check_grace_period_seconds=120 if entry is not None else None,
        propagate_tags='SERVICE',
        opts=pulumi.ResourceOptions(
            depends_on=depends_on, ignore_changes=['desiredCount'] if worker else None
        ),
    )
