"""Where state lives: the SQS queues, PostgreSQL (RDS) with its secrets, the workers' journal
(EFS) and the steps' outputs (S3)."""

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random
from deploy_config import PROJECT, DeployConfig
from network import Network, SecurityGroups

VISIBILITY_TIMEOUT_S = 60
MAX_RECEIVE_COUNT = 10
DLQ_RETENTION_S = 14 * 24 * 3600  # dagster_taskiq.sqs.DLQ_RETENTION_S
DB_NAME = DB_USER = 'dagster'
JOURNAL_UID = 1000
# dagster_taskiq_demo.definitions.demo_io_manager's s3_prefix: its objects are `demo/...`
OUTPUTS_PREFIX = 'demo'


@dataclass(frozen=True)
class Queues:
    step: aws.sqs.Queue
    retry: aws.sqs.Queue
    dlq: aws.sqs.Queue

    @property
    def arns(self) -> list[pulumi.Output[str]]:
        return [self.step.arn, self.retry.arn, self.dlq.arn]


@dataclass(frozen=True)
class Secrets:
    database: aws.secretsmanager.Secret
    signing_key: aws.secretsmanager.Secret
    versions: list[aws.secretsmanager.SecretVersion]


@dataclass(frozen=True)
class Journal:
    file_system: aws.efs.FileSystem
    access_point: aws.efs.AccessPoint
    mount_targets: list[aws.efs.MountTarget]


def queues(config: DeployConfig) -> Queues:
    """The step queue and its retry queue, both redriving to one dead-letter queue (as
    `dagster-taskiq bootstrap` makes them locally)."""
    dlq = aws.sqs.Queue(
        'dlq',
        name=config.dlq_name,
        message_retention_seconds=DLQ_RETENTION_S,
        visibility_timeout_seconds=VISIBILITY_TIMEOUT_S,
        sqs_managed_sse_enabled=True,
    )
    redrive = dlq.arn.apply(
        lambda arn: json.dumps({'deadLetterTargetArn': arn, 'maxReceiveCount': MAX_RECEIVE_COUNT})
    )

    def work_queue(name: str, queue_name: str) -> aws.sqs.Queue:
        return aws.sqs.Queue(
            name,
            name=queue_name,
            visibility_timeout_seconds=VISIBILITY_TIMEOUT_S,
            redrive_policy=redrive,
            sqs_managed_sse_enabled=True,
        )

    return Queues(
        step=work_queue('step-queue', config.queue_name),
        retry=work_queue('retry-queue', config.retry_queue_name),
        dlq=dlq,
    )


def secrets(config: DeployConfig, net: Network, groups: SecurityGroups) -> Secrets:
    """PostgreSQL with a generated password, its URL and the signing key in Secrets Manager."""
    prefix = f'{PROJECT}-{config.env}'
    password = random.RandomPassword('database-password', length=32, special=False)  # URL-safe
    subnets = aws.rds.SubnetGroup('database', name=prefix, subnet_ids=net.private_subnet_ids)
    database = aws.rds.Instance(
        'database',
        identifier=prefix,
        engine='postgres',
        engine_version='16',
        instance_class=config.db_instance_class,
        allocated_storage=config.db_allocated_storage_gb,
        max_allocated_storage=config.db_allocated_storage_gb * 5,
        storage_type='gp3',
        storage_encrypted=True,
        multi_az=config.db_multi_az,
        db_name=DB_NAME,
        username=DB_USER,
        password=password.result,
        db_subnet_group_name=subnets.name,
        vpc_security_group_ids=[groups.database.id],
        publicly_accessible=False,
        backup_retention_period=7 if config.protect_data else 1,
        deletion_protection=config.protect_data,
        skip_final_snapshot=not config.protect_data,
        final_snapshot_identifier=f'{prefix}-final' if config.protect_data else None,
        copy_tags_to_snapshot=True,
    )
    # psycopg2 in the scheme: dagster-postgres needs it, the store accepts it (README)
    url = pulumi.Output.format(
        'postgresql+psycopg2://{0}:{1}@{2}:{3}/{4}?sslmode=require',
        DB_USER,
        password.result,
        database.address,
        database.port,
        DB_NAME,
    )
    recovery_days = 30 if config.protect_data else 0  # 0: a rebuilt dev stack can reuse the name
    database_secret = aws.secretsmanager.Secret(
        'database', name=f'{PROJECT}/{config.env}/database', recovery_window_in_days=recovery_days
    )
    database_version = aws.secretsmanager.SecretVersion(
        'database',
        secret_id=database_secret.id,
        secret_string=pulumi.Output.json_dumps(
            {
                'username': DB_USER,
                'password': password.result,
                'host': database.address,
                'port': database.port,
                'dbname': DB_NAME,
                'url': url,
            }
        ),
    )
    key = random.RandomBytes('signing-key', length=32)  # 64 hex characters
    key_secret = aws.secretsmanager.Secret(
        'signing-key',
        name=f'{PROJECT}/{config.env}/signing-key',
        recovery_window_in_days=recovery_days,
    )
    key_version = aws.secretsmanager.SecretVersion(
        'signing-key', secret_id=key_secret.id, secret_string=key.hex
    )
    return Secrets(database_secret, key_secret, [database_version, key_version])


def journal(config: DeployConfig, net: Network, groups: SecurityGroups) -> Journal:
    """An EFS folder that outlives any worker: a dead worker's journal is taken over by the next."""
    file_system = aws.efs.FileSystem(
        'journal',
        creation_token=f'{PROJECT}-{config.env}-journal',
        encrypted=True,
        tags={'Name': f'{PROJECT}-{config.env}-journal'},
    )
    mount_targets = [
        aws.efs.MountTarget(
            f'journal-{i}',
            file_system_id=file_system.id,
            subnet_id=subnet,
            security_groups=[groups.file_system.id],
        )
        for i, subnet in enumerate(net.private_subnet_ids)
    ]
    access_point = aws.efs.AccessPoint(
        'journal',
        file_system_id=file_system.id,
        posix_user={'uid': JOURNAL_UID, 'gid': JOURNAL_UID},
        root_directory={
            'path': '/journal',
            'creation_info': {
                'owner_uid': JOURNAL_UID,
                'owner_gid': JOURNAL_UID,
                'permissions': '750',
            },
        },
    )
    return Journal(file_system, access_point, mount_targets)


def outputs_bucket(config: DeployConfig) -> aws.s3.Bucket:
    """Step outputs, through Dagster's IO manager: one worker writes what another reads. Named by
    Pulumi (bucket names are global), private, encrypted; they expire after outputsRetentionDays."""
    bucket = aws.s3.Bucket('step-outputs', force_destroy=not config.protect_data)
    aws.s3.BucketPublicAccessBlock(
        'step-outputs',
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        'step-outputs',
        bucket=bucket.id,
        rules=[{'apply_server_side_encryption_by_default': {'sse_algorithm': 'AES256'}}],
    )
    aws.s3.BucketLifecycleConfiguration(
        'step-outputs',
        bucket=bucket.id,
        rules=[
            {
                'id': 'expire-step-outputs',
                'status': 'Enabled',
                'filter': {'prefix': f'{OUTPUTS_PREFIX}/'},
                'expiration': {'days': config.outputs_retention_days},
                # an upload cut short (multipart above 8 MB) leaves parts the expiry never sees
                'abort_incomplete_multipart_upload': {'days_after_initiation': 1},
            }
        ],
    )
    return bucket
