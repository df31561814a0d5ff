"""The stack's settings: a typed, validated object read from Pulumi config (`Pulumi.<stack>.yaml`).

Defaults live here only; the stack files set what differs (sizes, multi-AZ, the UI's CIDR).
"""

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pulumi

PROJECT = 'dagster-taskiq'
DEFAULT_QUEUE_NAME = 'dagster-taskiq-steps'  # dagster_taskiq.defaults.DEFAULT_QUEUE_NAME
OPEN_CIDR = '0.0.0.0/0'


@dataclass(frozen=True)
class TaskSize:
    cpu: int  # Fargate CPU units (1024 = 1 vCPU)
    memory_mib: int


@dataclass(frozen=True)
class DeployConfig:
    env: str  # the stack's name: local, dev, prod
    region: str
    ui_allowed_cidr: str  # who may reach the Dagster UI through the load balancer
    queue_name: str = DEFAULT_QUEUE_NAME
    image_tag: str = 'latest'
    log_retention_days: int = 14
    outputs_retention_days: int = 14  # step outputs in S3 (re-executing a run needs its outputs)
    # Networking: a VPC of its own, unless all three are given
    vpc_cidr: str = '10.40.0.0/16'
    vpc_id: str | None = None
    public_subnet_ids: tuple[str, ...] = ()
    private_subnet_ids: tuple[str, ...] = ()
    nat_gateway_per_az: bool = False  # one NAT is cheaper; one per AZ survives an AZ outage
    # Database
    db_instance_class: str = 'db.t4g.micro'
    db_allocated_storage_gb: int = 20
    db_multi_az: bool = False
    protect_data: bool = False  # deletion protection, final snapshot, secrets' recovery window
    # Sizes and the worker pool
    service_size: TaskSize = field(default_factory=lambda: TaskSize(cpu=512, memory_mib=1024))
    worker_size: TaskSize = field(default_factory=lambda: TaskSize(cpu=1024, memory_mib=2048))
    worker_concurrency: int = 4
    min_workers: int = 0
    max_workers: int = 10
    target_backlog_per_worker: int = 4

    def __post_init__(self) -> None:
        ipaddress.ip_network(self.ui_allowed_cidr)  # ValueError when it is not a network
        if self.env == 'prod' and self.ui_allowed_cidr == OPEN_CIDR:
            raise ValueError('uiAllowedCidr: prod does not open the Dagster UI to the internet')
        given = [bool(self.vpc_id), bool(self.public_subnet_ids), bool(self.private_subnet_ids)]
        if any(given) and not all(given):
            raise ValueError('vpcId, publicSubnetIds and privateSubnetIds go together')
        if self.outputs_retention_days < 1:
            raise ValueError('outputsRetentionDays must be at least 1')
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError('minWorkers must be between 0 and maxWorkers')

    @property
    def cluster_name(self) -> str:
        return f'{PROJECT}-{self.env}'

    @property
    def retry_queue_name(self) -> str:
        return f'{self.queue_name}-retry'  # dagster_taskiq.sqs.retry_queue_name

    @property
    def dlq_name(self) -> str:
        return f'{self.queue_name}-dlq'  # dagster_taskiq.settings.Settings.dlq_name


# Pulumi config key -> DeployConfig field, by type
_STRINGS = {
    'queueName': 'queue_name',
    'imageTag': 'image_tag',
    'vpcCidr': 'vpc_cidr',
    'vpcId': 'vpc_id',
    'dbInstanceClass': 'db_instance_class',
}
_INTS = {
    'logRetentionDays': 'log_retention_days',
    'outputsRetentionDays': 'outputs_retention_days',
    'dbAllocatedStorageGb': 'db_allocated_storage_gb',
    'workerConcurrency': 'worker_concurrency',
    'minWorkers': 'min_workers',
    'maxWorkers': 'max_workers',
    'targetBacklogPerWorker': 'target_backlog_per_worker',
}
_BOOLS = {
    'natGatewayPerAz': 'nat_gateway_per_az',
    'dbMultiAz': 'db_multi_az',
    'protectData': 'protect_data',
}
_SUBNET_LISTS = {'publicSubnetIds': 'public_subnet_ids', 'privateSubnetIds': 'private_subnet_ids'}
_SIZES = {'serviceSize': 'service_size', 'workerSize': 'worker_size'}  # {cpu: 512, memoryMib: 1024}
CONFIG_KEYS = {'uiAllowedCidr', *_STRINGS, *_INTS, *_BOOLS, *_SUBNET_LISTS, *_SIZES}


def load_config() -> DeployConfig:
    """The running stack's settings (its name is the environment); keys left out keep defaults."""
    config = pulumi.Config()
    values: dict[str, Any] = {}
    for key, name in _STRINGS.items():
        values[name] = config.get(key)
    for key, name in _INTS.items():
        values[name] = config.get_int(key)
    for key, name in _BOOLS.items():
        values[name] = config.get_bool(key)
    for key, name in _SUBNET_LISTS.items():
        ids = config.get_object(key)
        values[name] = None if ids is None else tuple(ids)
    for key, name in _SIZES.items():
        size = config.get_object(key)
        values[name] = None if size is None else TaskSize(size['cpu'], size['memoryMib'])
    return DeployConfig(
        env=pulumi.get_stack(),
        region=pulumi.Config('aws').require('region'),
        ui_allowed_cidr=config.require('uiAllowedCidr'),
        **{name: value for name, value in values.items() if value is not None},
    )
